"""Write docs/models.md and the README's "Models that work" summary from the compatibility
suite's results (never run by the tests themselves).

    FASTFT_COMPAT_RESULTS=build/compat.json python -m pytest tests/test_compat_models.py
    python tests/helpers/compat_table.py build/compat.json

Each run of the suite adds the cases that passed to the JSON file, with the library versions
they ran with, so runs in several environments (one with timm and torchvision, whose wheels
need a torch of their own) add up.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from helpers.compat_models import CASES  # noqa: E402

LIBRARIES = ["transformers", "sentence-transformers", "timm", "torchvision"]
BEGIN, END = "<!-- models:begin -->", "<!-- models:end -->"

HEADER = """# Models that work

Generated from runs of `tests/test_compat_models.py`; do not edit by hand:

```bash
FASTFT_COMPAT_RESULTS=build/compat.json python -m pytest tests/test_compat_models.py
python tests/helpers/compat_table.py build/compat.json   # this file and the README's summary
```

A run adds the cases that passed to the JSON file, so runs in several environments add up
(timm and torchvision need a torch build of their own: they were run in a second venv with
`torch==2.13.0 torchvision==0.28.0 timm`). Cases that did not run anywhere say `not run`.

Every row is a model built from its library's own config class or constructor (tiny sizes,
random weights) and given to `FineTuner(model, num_classes=5, hidden=[16])` as is, with its
inputs as the library takes them (a tokenizer-style dict, an image batch). A row that
passed means, with an fp32 cache:

- `fit` equals naive frozen training of the same edited model (the whole model run on every
  batch, same batch order) to 1e-5;
- the frozen part ran once per sample (the first frozen layer saw each sample once);
- the frozen weights did not change;
- `export()` is the user's model class again, and its logits equal `predict()`.

*Split*: how fastft cut the model (`fx`: traced graph; `hook`: at the new head's input, the
model's own code running before it). *Cached per sample*: the shape of what the frozen part
gives the head, stored once per sample.
"""

LIMITS = """## Known limits

- A model whose new heads read different inputs and whose code combines their outputs, and
  which torch.fx cannot trace (Hugging Face `DeiTForImageClassificationWithTeacher`: two
  heads on two tokens, averaged), cannot be split: a `SplitError` says so. Use the model's
  single-head class (`DeiTForImageClassification`).
- A decoder classifier (GPT-2, Llama, ...) picks each sample's last non-pad token after its
  head; fastft moves that pick before the head only for a position-wise head (Linear,
  activations, dropout, LayerNorm; what `hidden=` builds). Another `head=` module is refused
  with the reason.
- A classifier fastft cannot read (neither a Linear, a 1x1 convolution, a Sequential ending
  in one, nor their `fc` / `out_proj` forms) is an error naming it: pass `head_name=`.
- Inputs go to `forward` as keywords only when `forward` names them (Hugging Face models);
  tokenizer keys the model does not take (`offset_mapping`) must be dropped.
"""


def _shape(shapes: list[list[int]]) -> str:
    return ", ".join("×".join(map(str, s)) or "scalar" for s in shapes)


def table(results: dict) -> str:
    lines = [
        "| library | family | model class | head replaced | split | cached per sample | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in CASES:
        r = results.get(case.id)
        if r is None:
            lines.append(f"| {case.library} | {case.family} | | | | not run | {case.note} |")
            continue
        head = "appended" if r["head"] == "appended" else f"`{r['head']}`"
        lines.append(
            f"| {case.library} | {case.family} | `{r['model']}` | {head} | {r['split']} "
            f"| {_shape(r['cached'])} | {case.note} |"
        )
    return "\n".join(lines)


def versions(results: dict) -> str:
    seen: dict[str, set[str]] = {}
    for r in results.values():
        for lib, v in r["versions"].items():
            seen.setdefault(lib, set()).add(v)
    return ", ".join(f"{lib} {'/'.join(sorted(v))}" for lib, v in sorted(seen.items()))


def summary(results: dict) -> str:
    passed = [c for c in CASES if c.id in results]
    by_lib = []
    for lib in LIBRARIES:
        families = [c.family for c in passed if c.library == lib and not c.variant]
        if len(families) > 1:
            by_lib.append(f"{lib} ({', '.join(families)})")
        elif families:
            by_lib.append(lib)
    return (
        f"{len(passed)} models train like naive frozen fine-tuning in the compatibility suite: "
        f"{'; '.join(by_lib)}. Table and limits: [docs/models.md](docs/models.md)."
    )


def main(paths: list[str]) -> None:
    results: dict = {}
    for p in paths:
        results.update(json.loads(Path(p).read_text()))
    doc = f"{HEADER}\nRan with {versions(results)}.\n\n{table(results)}\n\n{LIMITS}"
    (ROOT / "docs" / "models.md").write_text(doc)
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = f"{BEGIN}\n{textwrap.fill(summary(results), 92, break_on_hyphens=False)}\n{END}"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block to fill")
    readme.write_text(pattern.sub(lambda _: block, text))
    print(f"docs/models.md: {len(results)} of {len(CASES)} cases; README summary updated")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python tests/helpers/compat_table.py RESULTS.json [MORE.json]")
    main(sys.argv[1:])
