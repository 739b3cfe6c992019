"""Golden ids of gauss5930/AlpaGasus2-QLoRA's training/finetune.py, from its own code under the libraries of its time.

    ~/.cache/qlora-kit/reference-venvs/ag2/bin/python tools/reference/alpagasus2.py \
        --tokenizer DIR --input rows.jsonl --out golden.jsonl

Venv `ag2` (make_venvs.sh): transformers 4.31.0, tokenizers 0.13.3, trl 0.5.0, datasets 2.14.4,
torch (the source's requirements.txt pins nothing; these are the releases of its training
period, Aug 2023). DIR: the 2023 hub layout of meta-llama/Llama-2-7b-hf (tokenizer.json +
configs: the fast tokenizer, as AutoTokenizer gave it).

AG2 = gauss5930/AlpaGasus2-QLoRA @ 3f70e96fc509e01088daed9525212c6709fd1657. Code between
"# source:" markers is copied verbatim from the named file and lines; trl's tokenization and
transformers' collator are not copied but called, from the installed releases. Left out on
purpose: the unseeded 95/5 train_test_split (training/utils.py:L20-21; rows are tokenized one by
one, so the split decides only where a row goes). finetune.py passes
`max_seq_length=cut_off_len` (L161), a NameError; the defined name is `cutoff_len` (L29, default
256), which is what the harness uses. SFTTrainer truncates, never drops: every row is kept.
"""
from __future__ import annotations

import json
import os
import tempfile
from types import SimpleNamespace

from common import parse_args, read_rows, result, write_results

CUTOFF_LEN = 256  # source: gauss5930/AlpaGasus2-QLoRA/training/finetune.py:29 (default)
# datasets reads its cache location when imported: keep its cache in a folder of this run only
_TMP = tempfile.TemporaryDirectory(prefix="ag2-reference-")
os.environ["HF_DATASETS_CACHE"] = os.path.join(_TMP.name, "cache")
os.environ["HF_DATASETS_OFFLINE"] = "1"


# source: gauss5930/AlpaGasus2-QLoRA/training/utils.py:1-23
from datasets import load_dataset

# Loading json type dataset using load_dataset of datasets library
def loading_dataset(data_path, data_type, val_set_size):
  data = load_dataset(data_type, data_files = data_path)
  dataset = data['train']
  
  # This is the formatting function of dataset.
  # We follow the data format of Stanford Alpaca
  def formatting_prompts_func(example):
    if example['input']:
      text = f"Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{example['instruction']}\n\n### Input:\n{example['input']}\n\n### Response:\n{example['output']}"
    else:
      text = f"Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{example['instruction']}\n\n### Response:\n{example['output']}"
    return {'text': text}

  dataset = dataset.map(formatting_prompts_func)
  dataset = dataset.remove_columns(["instruction", "output", "input"])

  if val_set_size > 0:
    dataset = dataset.train_test_split(test_size = val_set_size)
    
  return dataset
# end source


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    rows = read_rows(args.input)
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling
    from trl import SFTTrainer

    with _TMP as tmp:
        data_path = os.path.join(tmp, "rows.json")
        with open(data_path, "w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False)
        # source: gauss5930/AlpaGasus2-QLoRA/training/finetune.py:83 (--data_type json, --val_set_size 0.05;
        # 0 here: the split is left out, see the module docstring)
        dataset = loading_dataset(data_path, "json", 0)
        # source: gauss5930/AlpaGasus2-QLoRA/training/finetune.py:108-117 (use_auth_token dropped)
        tokenizer = AutoTokenizer.from_pretrained(
            str(args.tokenizer),
            max_seq_length=CUTOFF_LEN,
            trust_remote_code=True,
        )

        # Tokenizer specific option
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        # end source
        # SFTTrainer(dataset_text_field="text", max_seq_length=cutoff_len, packing=False)
        # (finetune.py:155-165) tokenizes with trl 0.5.0's own method, called here unbound with the
        # two attributes it reads (trl/trainer/sft_trainer.py:280-315, 170-171 defaults)
        state = SimpleNamespace(dataset_num_proc=None, dataset_batch_size=1000)
        tokenized = SFTTrainer._prepare_non_packed_dataloader(state, tokenizer, dataset, "text", CUTOFF_LEN)
        # packing=False and no data_collator: DataCollatorForLanguageModeling(tokenizer, mlm=False)
        # (trl/trainer/sft_trainer.py:178-179), one row per call (no padding enters a row)
        collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)
        texts = dataset["text"]
        full = [len(x) for x in tokenizer(texts)["input_ids"]]
        ids_all = tokenized["input_ids"]

        def one(i: int):
            ids = list(ids_all[i])
            labels = collator([{"input_ids": ids}])["labels"][0].tolist()
            return result(i, True, None, ids, labels, n_ids_untruncated=full[i], truncated=full[i] > len(ids))

        n = write_results(args.out, (one(i) for i in range(len(rows))))
    print(f"{args.out}: {n} rows, all kept")


if __name__ == "__main__":
    main()
