"""Golden ids of id4thomas/llama2-koalpaca, from its own preprocessing code under its own libraries.

    ~/.cache/qlora-kit/reference-venvs/l2k/bin/python tools/reference/llama2_koalpaca.py \
        --tokenizer DIR --input rows.jsonl --out golden.jsonl

Venv `l2k` (make_venvs.sh): transformers 4.31.0, tokenizers 0.13.3, torch (the source's
requirements.txt pins these two libraries; torch only builds the tensors the code asks for).
DIR: the 2023 hub layout of meta-llama/Llama-2-*-hf (tokenizer.json + configs; AutoTokenizer
loads the fast tokenizer from tokenizer.json, as the source did).

L2K = id4thomas/llama2-koalpaca @ 059f34b8e40c2094236deffeec5fb8310d911fb2. Code between
"# source:" markers is copied verbatim (tabs and all) from the named file and lines; the rest is
this harness. What the harness leaves out, on purpose: the dataset download and the 99/1
train_test_split (train_qlora.py:L65, L82) - the length filter decides per row, so the split
changes which part a row lands in, never whether it is kept or its ids.
"""
from __future__ import annotations

import numpy as np
from transformers import AutoTokenizer, DataCollatorForLanguageModeling

from common import parse_args, read_rows, result, write_results

# source: id4thomas/llama2-koalpaca/utils/input_utils.py:1-2
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
# source: id4thomas/llama2-koalpaca/utils/input_utils.py:12
DEFAULT_SYSTEM_PROMPT = """당신은 도움이 되며, 예의바르고, 솔직한 조수입니다. 항상 안전하면서도 가능한 한 도움이 되는 답변을 해주세요. 아래는 작업을 설명하는 지시사항입니다. 요청을 적절히 완료하는 응답을 작성해주세요. 조수는 사용자의 질문에 도움이 되고, 상세하며, 정중한 답변을 합니다."""


# source: id4thomas/llama2-koalpaca/utils/input_utils.py:15-54
def llama_dialog_preprocess(dialog):
	if dialog[0]["role"] != "system":
		dialog = [
			{
				"role": "system",
				"content": DEFAULT_SYSTEM_PROMPT,
			}
		] + dialog
	dialog = [
		{
			"role": dialog[1]["role"],
			"content": B_SYS
			+ dialog[0]["content"]
			+ E_SYS
			+ dialog[1]["content"],
		}
	] + dialog[2:]
	assert all([msg["role"] == "user" for msg in dialog[::2]]) and all(
		[msg["role"] == "assistant" for msg in dialog[1::2]]
	), (
		"model only supports 'system', 'user' and 'assistant' roles, "
		"starting with 'system', then 'user' and alternating (u/a/u/a/u...)"
	)
	return dialog

def map_dialog_to_tokenizer_input(dialog):
	return f"{B_INST} {(dialog[0]['content']).strip()} {E_INST} {(dialog[1]['content']).strip()}"

def map_data_to_lambda_text(x):
	instruction = x["instruction"]
	output = x["output"]

	dialog = [
		# {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
		{"role": "user", "content": instruction},
		{"role": "assistant", "content": output}
	]
	processed_dialog = llama_dialog_preprocess(dialog)
	dialog_input = map_dialog_to_tokenizer_input(processed_dialog)
	return dialog_input
# end source


# source: id4thomas/llama2-koalpaca/utils/data_utils.py:9-14
def get_below_threshold_idxs(lens, threshold):
	lens = np.array(lens)
	return np.where(lens<threshold)[0]

def get_token_lens(tokenizer, fulltexts):
	return [tokenizer(fulltext, return_tensors="pt")["input_ids"].shape[-1] for fulltext in fulltexts]
# end source

TRAIN_TOKEN_CUTOFF_THRESHOLD = 1024  # source: id4thomas/llama2-koalpaca/train_qlora.py:44 (default)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    rows = read_rows(args.input)
    # source: id4thomas/llama2-koalpaca/train_qlora.py:67-71 (use_auth_token dropped: a local folder)
    tokenizer = AutoTokenizer.from_pretrained(
        str(args.tokenizer),
    )
    tokenizer.pad_token = tokenizer.eos_token
    # source: id4thomas/llama2-koalpaca/train_qlora.py:78-80 (data.map of the lambda, row by row)
    texts = [tokenizer.bos_token+map_data_to_lambda_text(x)+tokenizer.eos_token for x in rows]
    # source: id4thomas/llama2-koalpaca/train_qlora.py:86-88 (the same for the val part, L91-93)
    lens = get_token_lens(tokenizer, texts)
    selected = set(get_below_threshold_idxs(lens, TRAIN_TOKEN_CUTOFF_THRESHOLD).tolist())
    # source: id4thomas/llama2-koalpaca/train_qlora.py:96 (batched map of the same call)
    tokenized = tokenizer(texts, add_special_tokens=False)["input_ids"]
    # source: id4thomas/llama2-koalpaca/train_qlora.py:147 (the Trainer's collator; one row per call
    # so no padding is added: the labels of a row do not depend on its batch mates, except that
    # padding positions, labelled -100, are not part of the row)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    def one(i: int):
        if i not in selected:
            return result(i, False, "overlength", None, None, counted_len=lens[i])
        ids = tokenized[i]
        labels = collator([{"input_ids": ids}])["labels"][0].tolist()
        return result(i, True, None, ids, labels, counted_len=lens[i])

    n = write_results(args.out, (one(i) for i in range(len(rows))))
    print(f"{args.out}: {n} rows, {len(selected)} kept")


if __name__ == "__main__":
    main()
