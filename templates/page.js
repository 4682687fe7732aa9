// The upload page's script. Without it the form posts the original file to / and the server renders the answer.
// With it: a preview, drag and drop, the answer shown in place (POST /v1/vqa), and a large photo shrunk in the
// browser before it is sent: a 12 MP phone JPEG (3 MB) leaves as a JPEG of at most 2x the model's input size on
// its longer side (a few hundred KB), upright (EXIF orientation applied), so that the upload is fast, the
// server's decode is cheap, and a retry after a worker dies is always possible (HAProxy buffers up to 1 MiB).
// With keys on (the page has an #api_key field) the key is remembered in this browser (localStorage) and sent as
// `Authorization: Bearer`, never in the form body, so a wrong key is forgotten at the 401 and typed again.
// A further question about the same picture names it by the `image_id` of the last answer instead of sending it
// again (no image bytes leave the browser); if the server no longer holds it (409 image_not_cached), the picture is
// sent once more. The id is kept on the form as data-image-id and forgotten when another picture is chosen.
// On the demo model the page offers example pictures (buttons.example): a click chooses the picture (its bytes are
// in the img's data: URL), fills in its question and asks it, as if the user had done each step.
// No inline script or style anywhere: the Content-Security-Policy allows only this file and page.css.
(() => {
  const form = document.getElementById("ask");
  const file = document.getElementById("image");
  const drop = document.getElementById("drop");
  const preview = document.getElementById("preview");
  const result = document.getElementById("result");
  const imageRes = Number(form.dataset.imageRes) || 0; // the loaded model's input size (0: not known yet)
  const keyField = document.getElementById("api_key"); // present only when the server asks for a key
  const KEY_ITEM = "vqa-async-api-key";

  function storage() {
    try { return window.localStorage; } catch (err) { return null; } // blocked storage: ask every time
  }
  if (keyField && storage()) keyField.value = storage().getItem(KEY_ITEM) || "";

  // The picture whose id the form holds (data-image-id): a follow-up names it instead of sending it.
  let answered = null;
  function forget() { answered = null; delete form.dataset.imageId; }

  function show(f) {
    forget();
    if (!f) return;
    preview.src = URL.createObjectURL(f);
    preview.style.display = "block";
  }
  file.addEventListener("change", () => show(file.files[0]));
  ["dragenter", "dragover"].forEach(t => drop.addEventListener(t, e => { e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach(t => drop.addEventListener(t, e => { e.preventDefault(); drop.classList.remove("over"); }));
  drop.addEventListener("drop", e => {
    if (e.dataTransfer.files.length) { file.files = e.dataTransfer.files; show(file.files[0]); }
  });

  document.querySelectorAll("button.example").forEach(button => button.addEventListener("click", () => {
    const encoded = button.querySelector("img").src.split(",")[1];
    const bytes = Uint8Array.from(atob(encoded), c => c.charCodeAt(0));
    const picked = new File([bytes], button.dataset.file, { type: "image/png" });
    const chosen = new DataTransfer();
    chosen.items.add(picked);
    file.files = chosen.files;
    show(picked);
    document.getElementById("question").value = button.dataset.question;
    form.requestSubmit();
  }));

  function render(html) { result.innerHTML = html; result.hidden = false; }
  function esc(s) { const d = document.createElement("div"); d.textContent = s; return d.innerHTML; }

  // The file as it should be sent: the original when it is small enough (or cannot be read here: the server
  // then says what is wrong with it), else a JPEG whose longer side is 2x the model's input size.
  async function shrunk(f) {
    if (!f || !imageRes || !window.createImageBitmap) return f;
    let bitmap;
    try {
      bitmap = await createImageBitmap(f, { imageOrientation: "from-image" }); // upright, as the user sees it
    } catch (err) {
      return f;
    }
    const limit = 2 * imageRes;
    const scale = limit / Math.max(bitmap.width, bitmap.height);
    if (scale >= 1) { bitmap.close(); return f; }
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(bitmap.width * scale));
    canvas.height = Math.max(1, Math.round(bitmap.height * scale));
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#fff"; // JPEG has no alpha: transparency on white, as the server composites it
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    bitmap.close();
    const blob = await new Promise(resolve => canvas.toBlob(resolve, "image/jpeg", 0.9));
    if (!blob) return f;
    return new File([blob], f.name.replace(/\.[^.]*$/, "") + ".jpg", { type: "image/jpeg" });
  }

  // POST /v1/vqa: the picture by its id when the server answered about it last, else the (shrunk) picture.
  async function post(byId, headers) {
    const body = new FormData(form);
    body.delete("api_key");
    if (byId) {
      body.delete("image");
      body.set("image_id", form.dataset.imageId);
    } else {
      const upload = await shrunk(file.files[0]);
      if (upload) body.set("image", upload, upload.name);
    }
    const resp = await fetch("/v1/vqa", { method: "POST", body, headers });
    return { resp, reply: await resp.json() };
  }

  form.addEventListener("submit", async e => {
    e.preventDefault();
    render("<p>Thinking…</p>");
    try {
      const headers = {};
      if (keyField) {
        const key = keyField.value.trim();
        headers.Authorization = "Bearer " + key;
        if (storage()) storage().setItem(KEY_ITEM, key);
      }
      const chosen = file.files[0];
      const byId = Boolean(chosen && chosen === answered && form.dataset.imageId);
      let { resp, reply } = await post(byId, headers);
      if (byId && resp.status === 409 && reply.error && reply.error.code === "image_not_cached") {
        forget(); // evicted, or the server restarted: send the picture again
        ({ resp, reply } = await post(false, headers));
      }
      if (resp.status === 401 && keyField) {
        if (storage()) storage().removeItem(KEY_ITEM);
        keyField.value = "";
      }
      if (!resp.ok) {
        render(`<p class="error" id="error">${esc(reply.error.message)} <code>(${esc(reply.error.code)})</code></p>`);
        return;
      }
      if (reply.image_id) { answered = chosen; form.dataset.imageId = reply.image_id; }
      render(`<p>Answer: <span class="answer" id="answer">${esc(reply.answer)}</span></p>` +
             `<p class="timings" id="timings">queue ${reply.queue_ms} ms · compute ${reply.compute_ms} ms · ` +
             `batch of ${reply.batch_size}</p>`);
    } catch (err) {
      render(`<p class="error" id="error">${esc(String(err))}</p>`);
    }
  });
})();
