"""Golden ids of davidkim205/komt's finetune_with_lora.py, from its own code under its own libraries.

    ~/.cache/qlora-kit/reference-venvs/komt/bin/python tools/reference/komt.py \
        --tokenizer DIR --input rows.jsonl --out golden.jsonl

Venv `komt` (make_venvs.sh): transformers 4.34.0, tokenizers 0.14.1, sentencepiece 0.1.99, torch
(komt's README names no versions; 4.34.0 is the release of its 2023-10 parameter commit 2fc7039).
DIR: the tokenizer files of davidkim205/komt-llama2-7b-v1 (tokenizer.model, tokenizer_config.json
with legacy false, added_tokens.json {"<pad>": 32000}, special_tokens_map.json, no tokenizer.json),
loaded with use_fast=False: the sentencepiece "slow" LlamaTokenizer of transformers 4.34.

KOMT = davidkim205/komt @ 0c9622e184f87b4dd75fd1c52d668379a27aeca5. Code between "# source:"
markers is copied verbatim from the named file and lines; the rest is this harness. Left out on
purpose: `random.shuffle(list_data_dict)` (finetune_with_lora.py:123, unseeded) - it changes the
order of rows, never a row's ids. komt never drops a row: longer texts are truncated at
model_max_length (L84-85), so every row is kept. (The source file has CRLF line ends; the copies
here have LF.)
"""
from __future__ import annotations

import copy
from typing import Dict, Sequence

import transformers
from tqdm import tqdm

from common import parse_args, read_rows, result, write_results

IGNORE_INDEX = -100  # source: davidkim205/komt/finetune_with_lora.py:19
MODEL_MAX_LENGTH = 2048  # source: davidkim205/komt/finetune_with_lora.py:38-41 (default)


# source: davidkim205/komt/finetune_with_lora.py:77-113
def _tokenize_fn(strings: Sequence[str], tokenizer: transformers.PreTrainedTokenizer) -> Dict:
    """Tokenize a list of strings."""
    tokenized_list = [
        tokenizer(
            text,
            return_tensors="pt",
            padding="longest",
            max_length=tokenizer.model_max_length,
            truncation=True,
        )
        for text in strings
    ]
    input_ids = labels = [tokenized.input_ids[0] for tokenized in tokenized_list]
    input_ids_lens = labels_lens = [
        tokenized.input_ids.ne(tokenizer.pad_token_id).sum().item() for tokenized in tokenized_list
    ]
    return dict(
        input_ids=input_ids,
        labels=labels,
        input_ids_lens=input_ids_lens,
        labels_lens=labels_lens,
    )


def preprocess(
        sources: Sequence[str],
        targets: Sequence[str],
        tokenizer: transformers.PreTrainedTokenizer,
) -> Dict:
    """Preprocess the data by tokenizing."""
    examples = [s + t for s, t in zip(sources, targets)]
    examples_tokenized, sources_tokenized = [_tokenize_fn(strings, tokenizer) for strings in (tqdm(examples), sources)]
    input_ids = examples_tokenized["input_ids"]
    labels = copy.deepcopy(input_ids)
    for label, source_len in zip(labels, sources_tokenized["input_ids_lens"]):
        label[:source_len] = IGNORE_INDEX
    return dict(input_ids=input_ids, labels=labels)
# end source


def load_tokenizer(path: str) -> transformers.PreTrainedTokenizer:
    # source: davidkim205/komt/finetune_with_lora.py:266-280 (cache_dir dropped: a local folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        path,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        use_fast=False,
    )

    tokenizer.add_special_tokens(
        {
            "eos_token": "</s>",
            "bos_token": "</s>",
            "unk_token": "</s>",
        }
    )
    # end source
    return tokenizer


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    list_data_dict = read_rows(args.input)
    tokenizer = load_tokenizer(str(args.tokenizer))
    # source: davidkim205/komt/finetune_with_lora.py:126-130
    prompt_input = ("{instruction}\n\n### Response:")
    sources = [
        prompt_input.format_map(example) for example in list_data_dict
    ]
    targets = [f"{example['output']}{tokenizer.eos_token}" for example in list_data_dict]
    # end source
    data_dict = preprocess(sources, targets, tokenizer)  # source: davidkim205/komt/finetune_with_lora.py:144
    # what truncation hid: the untruncated lengths, for reading only
    full = [len(tokenizer(s + t).input_ids) for s, t in zip(sources, targets)]

    def one(i: int):
        ids, labels = data_dict["input_ids"][i].tolist(), data_dict["labels"][i].tolist()
        return result(i, True, None, ids, labels, n_ids_untruncated=full[i], truncated=full[i] > len(ids))

    n = write_results(args.out, (one(i) for i in range(len(list_data_dict))))
    print(f"{args.out}: {n} rows, all kept")


if __name__ == "__main__":
    main()
