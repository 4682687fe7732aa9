"""Train the shipped demo model: the mPLUG architecture (ModelScope's classes) at easy-VQA's scale.

Seeded, CPU, a progress bar. The loss is that of ModelScope's `forward(train=True)` without distillation, computed
by the model's own modules with one change that only saves time: a step takes a group of images with all of their
questions (easy-VQA asks about 10 per image), and the vision encoder runs once per image instead of once per
question. The result is written in the serving format, float32, the dtype it runs in on CPU.

    python -m tools.train_demo --out vqa_async/demo --epochs 12      (from the repository's root)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import addict
import numpy as np
import torch
from tqdm import tqdm

from vqa_async.model.architecture import WEIGHTS_NAME, ServingMPlugVQA, read_config
from vqa_async.model.forward import fuse, project_image
from vqa_async.model.preprocess import QuestionTokenizer, image_transform, to_rgb
from vqa_async.model.presets import DEMO
from vqa_async.model.weights import save_serving_weights


def load_split(split: str, image_res: int) -> tuple[torch.Tensor, list[str], list[str], list[int]]:
    import easy_vqa
    from PIL import Image

    get_q = easy_vqa.get_train_questions if split == "train" else easy_vqa.get_test_questions
    get_p = easy_vqa.get_train_image_paths if split == "train" else easy_vqa.get_test_image_paths
    questions, answers, image_ids = get_q()
    paths = get_p()
    tf = image_transform(image_res)
    n = max(paths) + 1
    pixels = torch.zeros(n, 3, image_res, image_res)
    for i, p in paths.items():
        with Image.open(p) as img:
            pixels[i] = tf(to_rgb(img))
    return pixels, list(questions), list(answers), [int(i) for i in image_ids]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="vqa_async/demo")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=0,
                    help="random batches of this many questions (0: batches grouped by image, below)")
    ap.add_argument("--images-per-step", type=int, default=32)
    ap.add_argument("--questions-per-image", type=int, default=3,
                    help="questions drawn per image and step (0: all of them, ~10)")
    ap.add_argument("--init", default=None, help="start from this serving directory's weights instead of random")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--vision-lr-mult", type=float, default=1.0,
                    help="learning-rate multiplier for the vision encoder, which learns shapes slowly from the "
                         "answer loss alone")
    ap.add_argument("--aux-shape-weight", type=float, default=0.0,
                    help="weight of an auxiliary shape-classification loss on the pooled ViT output (training only; "
                         "the head is not saved): it gives the vision encoder a direct signal")
    ap.add_argument("--warmup", type=float, default=0.05, help="share of steps with linear warm-up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=1, help="epochs between quick checks on 512 test questions")
    args = ap.parse_args(argv)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    DEMO.write_configs(out)
    config = read_config(out)
    model = ServingMPlugVQA(config)
    if args.init:
        from safetensors.torch import load_file

        missing, unexpected = model.load_state_dict(load_file(str(Path(args.init) / WEIGHTS_NAME)), strict=False)
        assert not unexpected and all(k.endswith(("position_ids", "decoder.weight", "decoder.bias"))
                                      for k in missing), (missing, unexpected)
        print(f"starting from {args.init}", flush=True)
    tok = QuestionTokenizer(str(out))

    t0 = time.time()
    pixels, questions, answers, image_ids = load_split("train", config.image_res)
    # Padding beyond the longest question changes nothing (it is masked out), so train on 12 tokens, not 25.
    q = tok.encode(questions)
    q_ids, q_mask = q.input_ids[:, :TRAIN_QUESTION_TOKENS], q.attention_mask[:, :TRAIN_QUESTION_TOKENS]
    assert int(q.attention_mask[:, TRAIN_QUESTION_TOKENS:].sum()) == 0, "a training question is longer than expected"
    a = tok.tokenizer(answers, padding="max_length", truncation=True, max_length=4, return_tensors="pt")
    by_image: dict[int, list[int]] = {}
    for qi, ii in enumerate(image_ids):
        by_image.setdefault(ii, []).append(qi)
    images = sorted(by_image)
    test_pixels, test_q, test_a, test_ids = load_split("test", config.image_res)
    print(f"data: {len(questions)} train questions, loaded in {time.time() - t0:.1f}s", flush=True)

    n_questions = len(questions)
    steps_per_epoch = math.ceil(n_questions / args.batch_size) if args.batch_size else \
        math.ceil(len(images) / args.images_per_step)
    total = steps_per_epoch * args.epochs
    warmup = max(1, int(total * args.warmup))
    # Images whose shape a training answer names: the auxiliary loss's labels (-100: unknown, ignored).
    shape_label = torch.full((pixels.shape[0],), -100, dtype=torch.long)
    for ans, ii in zip(answers, image_ids):
        if ans in SHAPES:
            shape_label[ii] = SHAPES.index(ans)
    aux_head = torch.nn.Linear(int(config.clip_vision_width), len(SHAPES)) if args.aux_shape_weight else None
    vision = [p for n, p in model.named_parameters() if n.startswith("visual_encoder.")]
    vision += list(aux_head.parameters()) if aux_head is not None else []
    rest = [p for n, p in model.named_parameters() if not n.startswith("visual_encoder.")]
    opt = torch.optim.AdamW([{"params": rest, "lr": args.lr},
                             {"params": vision, "lr": args.lr * args.vision_lr_mult}], weight_decay=0.02)

    def lr_factor(s: int) -> float:  # linear warm-up, then cosine to zero
        return (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    history = []
    t_start = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n_questions if args.batch_size else len(images), generator=gen).tolist()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", mininterval=5)
        running = 0.0
        for step in bar:
            if args.batch_size:  # random questions; the ViT still runs once per distinct image among them
                idx_list = perm[step * args.batch_size:(step + 1) * args.batch_size]
                group = list(dict.fromkeys(image_ids[qi] for qi in idx_list))
                idx = torch.tensor(idx_list)
                which = torch.tensor([group.index(image_ids[qi]) for qi in idx_list])
            else:
                group = [images[j] for j in perm[step * args.images_per_step:(step + 1) * args.images_per_step]]
                chosen = [pick(by_image[ii], args.questions_per_image, rng) for ii in group]
                idx = torch.tensor([qi for qs in chosen for qi in qs])
                which = torch.tensor([g for g, qs in enumerate(chosen) for _ in qs])
            aux = (aux_head, shape_label[torch.tensor(group)], args.aux_shape_weight) if aux_head is not None else None
            loss = vqa_loss(model, pixels[torch.tensor(group)], which, q_ids[idx], q_mask[idx],
                            a.input_ids[idx], a.attention_mask[idx], aux)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            running = 0.98 * running + 0.02 * float(loss) if step else float(loss)
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            acc = quick_accuracy(model, tok, test_pixels, test_q, test_a, test_ids, 512)
            history.append({"epoch": epoch + 1, "loss": round(running, 4), "quick_accuracy": acc,
                            "elapsed_s": round(time.time() - t_start, 1)})
            print(json.dumps(history[-1]), flush=True)
            save_serving_weights(model, out, dtype=torch.float32)
    train_s = time.time() - t_start
    save_serving_weights(model, out, dtype=torch.float32)
    previous = None
    if args.init and (Path(args.init) / "TRAINING.json").exists():  # a continued run keeps its history
        previous = json.loads((Path(args.init) / "TRAINING.json").read_text())
    (out / "TRAINING.json").write_text(json.dumps({
        "command": "python -m tools.train_demo " + " ".join(argv if argv is not None else sys.argv[1:]),
        "vision_lr_mult": args.vision_lr_mult, "aux_shape_weight": args.aux_shape_weight, "previous": previous,
        "dataset": "easy-vqa 1.0 (train split)", "epochs": args.epochs,
        "batch_size": args.batch_size, "images_per_step": args.images_per_step,
        "questions_per_image": args.questions_per_image,
        "init": args.init, "warmup": args.warmup,
        "lr": args.lr, "seed": args.seed, "train_seconds": round(train_s, 1), "torch_threads": torch.get_num_threads(),
        "history": history}, indent=2) + "\n")
    print(f"trained in {train_s / 60:.1f} min; wrote {out}")


TRAIN_QUESTION_TOKENS = 12


def pick(questions: list[int], k: int, rng: random.Random) -> list[int]:
    return questions if k <= 0 or k >= len(questions) else rng.sample(questions, k)


SHAPES = ["circle", "rectangle", "triangle"]


def vqa_loss(model: ServingMPlugVQA, pixels: torch.Tensor, which: torch.Tensor, q_ids: torch.Tensor,
             q_mask: torch.Tensor, a_ids: torch.Tensor, a_mask: torch.Tensor,
             aux: tuple[torch.nn.Module, torch.Tensor, float] | None = None) -> torch.Tensor:
    """`MPlugForVisualQuestionAnswering.forward(train=True)` with distill off, the ViT run once per distinct image:
    question i is about `pixels[which[i]]`. Mean over questions of each answer's summed token loss."""
    vision_out = model.visual_encoder.visual(pixels, skip_last_layer=True)
    aux_loss = torch.zeros(())
    if aux is not None:
        head, labels, weight = aux
        if bool((labels >= 0).any()):
            aux_loss = weight * torch.nn.functional.cross_entropy(head(vision_out.mean(1)), labels, ignore_index=-100)
    # The forward pass the server runs (model/forward.py), so that training cannot drift from serving.
    states, atts = fuse(model, project_image(model, vision_out).index_select(0, which), q_ids, q_mask)
    targets = a_ids.masked_fill(a_ids == model.tokenizer.pad_token_id, -100)
    out = model.text_decoder(a_ids, attention_mask=a_mask, encoder_hidden_states=states,
                             encoder_attention_mask=atts, labels=targets, return_dict=True, reduction="none")
    return out.loss.sum() / q_ids.shape[0] + aux_loss


@torch.no_grad()
def quick_accuracy(model: ServingMPlugVQA, tok: QuestionTokenizer, pixels: torch.Tensor, questions: list[str],
                   answers: list[str], image_ids: list[int], limit: int) -> float:
    model.eval()
    sel = list(range(0, len(questions), max(1, len(questions) // limit)))[:limit]
    correct = 0
    for s in range(0, len(sel), 128):
        chunk = sel[s:s + 128]
        enc = tok.encode([questions[i] for i in chunk])
        question = addict.Dict(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        topk_ids, _ = model(pixels[torch.tensor([image_ids[i] for i in chunk])], question, train=False)
        for i, ids in zip(chunk, topk_ids):
            correct += tok.decode(ids[0]) == answers[i]
    return round(correct / len(sel), 4)


if __name__ == "__main__":
    main()
