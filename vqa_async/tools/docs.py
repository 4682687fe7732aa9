"""The reference pages printed from the code that defines them, so that they cannot drift from it:

    python -m vqa_async.tools.docs settings   # docs/settings.md, from the settings groups (vqa_async/config/)
    python -m vqa_async.tools.docs errors     # docs/errors.md, from the error-code registry
    python -m vqa_async.tools.docs            # both, written into docs/
    python -m vqa_async.tools.docs --check    # exit 1 if a committed page differs (tests/test_reference.py too)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def _settings() -> str:
    from vqa_async.config.docs import settings_page

    return settings_page()


def _errors() -> str:
    from vqa_async.http.error_codes import errors_page

    return errors_page()


PAGES: dict[str, tuple[str, Callable[[], str]]] = {"settings": ("settings.md", _settings),
                                                   "errors": ("errors.md", _errors)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vqa_async.tools.docs", description=__doc__.splitlines()[0])
    p.add_argument("page", nargs="?", choices=sorted(PAGES), help="print this page (default: write every page)")
    p.add_argument("--docs", type=Path, default=Path("docs"), help="the docs directory (default: ./docs)")
    p.add_argument("--check", action="store_true", help="compare the committed pages instead of writing them")
    args = p.parse_args(argv)
    if args.page and not args.check:
        sys.stdout.write(PAGES[args.page][1]())
        return 0
    stale = []
    for name in [args.page] if args.page else sorted(PAGES):
        file, render = PAGES[name]
        path = args.docs / file
        text = render()
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run: python -m vqa_async.tools.docs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
