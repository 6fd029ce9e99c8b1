"""Write two local lm-evaluation-harness tasks (no hub access) from a JSONL corpus.

    python examples/lm_eval/make_task.py CORPUS.jsonl OUT_DIR [--docs 40]

CORPUS.jsonl holds one {"text": ...} document per line (``polycom-megatron data`` and
``train-cpu`` write one: DATA_DIR/pydoc_corpus.jsonl). OUT_DIR receives

* ``next_words.jsonl`` + ``next_words.yaml``: multiple choice. The context is the start of a
  held-out paragraph, the choices its true next 8 words and 3 spans of 8 words from other
  documents; metric: accuracy (chance = 0.25).
* ``rolling_ppl.jsonl`` + ``rolling_ppl.yaml``: whole documents scored with
  ``loglikelihood_rolling``; metrics: word and byte perplexity, bits per byte.

Then, with lm_eval installed (``pip install lm_eval``; it needs only the exported model dir,
not polycom-megatron, thanks to trust_remote_code):

    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model hf \\
        --model_args pretrained=EXPORTED_DIR,trust_remote_code=True,dtype=float32,max_length=512 \\
        --tasks next_words,rolling_ppl --include_path OUT_DIR --device cpu --batch_size 4

Documents are taken from the end of the corpus (a run that trained on all of it has seen
them; point CORPUS at held-out text for a real evaluation). Stdlib only.
"""

import argparse
import json
import random
from pathlib import Path

SPAN = 8

NEXT_WORDS = """task: next_words
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

ROLLING = """task: rolling_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--docs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    texts = [json.loads(line)["text"] for line in args.corpus.open(encoding="utf-8") if line.strip()]
    paragraphs = [par.split() for t in texts for par in t.split("\n\n")]
    paragraphs = [w for w in paragraphs if len(w) >= 3 * SPAN][-4 * args.docs:]
    if len(paragraphs) < args.docs + 3:
        raise SystemExit(f"{args.corpus}: too few paragraphs of {3 * SPAN}+ words")
    rng = random.Random(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(args.docs):
        words = paragraphs[i]
        cut = rng.randrange(SPAN, len(words) - SPAN)
        others = rng.sample([w for j, w in enumerate(paragraphs) if j != i], 3)
        distractors = [" ".join(o[(s := rng.randrange(len(o) - SPAN)):s + SPAN]) for o in others]
        label = rng.randrange(4)
        choices = distractors[:label] + [" ".join(words[cut:cut + SPAN])] + distractors[label:]
        items.append({"context": " ".join(words[:cut]), "choices": choices, "label": label})
    mc = args.out_dir / "next_words.jsonl"
    mc.write_text("".join(json.dumps(x) + "\n" for x in items), encoding="utf-8")
    (args.out_dir / "next_words.yaml").write_text(NEXT_WORDS.format(data=mc.resolve()))
    rolling = args.out_dir / "rolling_ppl.jsonl"
    docs = [" ".join(w) for w in paragraphs[: args.docs // 2]]
    rolling.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    (args.out_dir / "rolling_ppl.yaml").write_text(ROLLING.format(data=rolling.resolve()))
    print(f"wrote {len(items)} multiple-choice items and {len(docs)} documents to {args.out_dir}")


if __name__ == "__main__":
    main()
