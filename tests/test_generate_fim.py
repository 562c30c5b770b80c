"""Fill-in-the-middle generation: the exact prompt ids, only the middle back, settings read
from the folder's replit_ft.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from finetune.cli import main
from finetune.generate import fim_settings, finish, generate, load_for_generation
from model import load_model
from model.random_checkpoint import write_checkpoint

PRE, SUF, MID, EOS = 47, 48, 49, 1
PREFIX = "def area(r):\n    "
SUFFIX = "\n    return result\n"
FIM = {"rate": 0.5, "spm_rate": 0.5, "prefix_id": PRE, "suffix_id": SUF, "middle_id": MID}


def write_info(folder: Path, fim: dict | None) -> None:
    """replit_ft.json as train and merge write it (only `fim` matters here)."""
    info = {"base": "tiny", "max_seq_len": 2048, "data": {"fingerprint": "x"}, "fim": fim}
    (folder / "replit_ft.json").write_text(json.dumps({**info, "recipe": {}}))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, real_tokenizer_dir) -> Path:
    path = tmp_path_factory.mktemp("fim_model")
    write_checkpoint(path, n_layers=2, d_model=192, n_heads=6, tokenizer=real_tokenizer_dir, seed=1)
    write_info(path, FIM)
    return path


class Prompts:
    """The input ids of every generate() call (its first forward pass sees the whole prompt)."""

    def __init__(self, model):
        self.model = model
        self.seen: list[list[list[int]]] = []
        self.calls = 0

    def __enter__(self) -> Prompts:
        self.handle = self.model.register_forward_pre_hook(self.hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def hook(self, module, args, kwargs) -> None:
        self.calls += 1
        if self.calls == 1:
            self.seen.append(kwargs["input_ids"].tolist())


def greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=2
    )
    return out[0, len(ids) :].tolist()


def test_prompt_ids_and_only_the_middle_up_to_eos(checkpoint):
    """EOS's embedding becomes a copy of token X's: greedy decoding, which took X at step k,
    now takes EOS there (argmax picks the lowest id), so the middle is the k tokens before."""
    model, tokenizer = load_for_generation(checkpoint)
    sp = tokenizer.sp_model
    prompt = [PRE, *sp.encode(PREFIX), SUF, *sp.encode(SUFFIX), MID]  # PSM at spm_rate 0.5
    ids = greedy(model, prompt, 20)
    k = next(i for i in range(1, 20) if ids[i] not in ids[:i])
    with torch.no_grad():
        model.transformer.wte.weight[EOS] = model.transformer.wte.weight[ids[k]]
    fim = fim_settings(checkpoint)
    pieces: list[str] = []
    with Prompts(model) as seen:
        got = generate(
            model,
            tokenizer,
            [PREFIX],
            suffix=[SUFFIX],
            fim=fim,
            temperature=0,
            max_new_tokens=20,
            on_text=lambda i, text: pieces.append(text),
        )
    assert seen.seen == [[prompt]]
    middle = tokenizer.decode(ids[:k])
    assert got == [middle] and "".join(pieces) == middle  # untrimmed, streamed whole
    assert seen.calls == k + 1  # stopped at EOS


def test_the_middle_keeps_its_trailing_whitespace(checkpoint):
    """A tab's embedding becomes a copy of the first greedy token A's: the tie goes to the tab
    (the lower id) wherever greedy decoding took A, and EOS takes the first other token."""
    model, tokenizer = load_for_generation(checkpoint)
    sp = tokenizer.sp_model
    prompt = [PRE, *sp.encode(PREFIX), SUF, *sp.encode(SUFFIX), MID]
    ids = greedy(model, prompt, 20)
    k = next(i for i, x in enumerate(ids) if x != ids[0])
    tab = sp.piece_to_id("\t")
    assert tab < ids[0] and tab not in prompt
    with torch.no_grad():
        wte = model.transformer.wte.weight
        wte[tab], wte[EOS] = wte[ids[0]], wte[ids[k]]
    fim = fim_settings(checkpoint)
    got = generate(model, tokenizer, [PREFIX], suffix=[SUFFIX], fim=fim, temperature=0)
    assert got == ["\t" * k]  # all whitespace, kept: it goes between prefix and suffix


def test_spm_order_literal_sentinels_and_batches(checkpoint, tmp_path):
    model, tokenizer = load_for_generation(checkpoint)
    sp = tokenizer.sp_model
    fim = fim_settings(checkpoint)
    spm = type(fim)(**{**FIM, "spm_rate": 0.9})  # trained mostly SPM: prompt in SPM order
    prefixes = ["x = '<extra_id_0>'\n", "", "import os\n"]
    suffixes = ["<extra_id_2>", "\n", ""]
    settings = {"temperature": 0, "max_new_tokens": 6}
    with Prompts(model) as seen:
        generate(model, tokenizer, prefixes[:1], suffix=suffixes[:1], fim=spm, **settings)
    # The literal sentinel text stays text: cut after its "<", the parts encoded apart.
    p = sp.encode("x = '<") + sp.encode("extra_id_0>'\n")
    s = sp.encode("<") + sp.encode("extra_id_2>")
    assert seen.seen == [[[PRE, SUF, *s, MID, *p]]]
    alone = [
        generate(model, tokenizer, [a], suffix=[b], fim=fim, **settings)[0]
        for a, b in zip(prefixes, suffixes, strict=True)
    ]
    with Prompts(model) as seen:
        batched = generate(model, tokenizer, prefixes, suffix=suffixes, fim=fim, **settings)
    assert batched == alone  # left-padded batch, an empty prefix included
    row, want = seen.seen[0][1], [PRE, SUF, *sp.encode("\n"), MID]  # PSM, empty prefix
    assert row[-len(want) :] == want and set(row[: -len(want)]) == {2}  # padded on the left
    with pytest.raises(ValueError, match=r"one suffix per prompt \(3\)"):
        generate(model, tokenizer, prefixes, suffix=suffixes[:2], fim=fim)
    with pytest.raises(ValueError, match="fill-in-the-middle settings: fim="):
        generate(model, tokenizer, prefixes, suffix=suffixes)
    assert finish("x = 1  \n", ["never"], trim=False) == "x = 1  \n"


def test_command_line(checkpoint, tmp_path, capsys):
    model, tokenizer = load_for_generation(checkpoint)
    fim = fim_settings(checkpoint)
    settings = {"temperature": 0, "max_new_tokens": 12}
    want = generate(model, tokenizer, [PREFIX, "y = "], suffix=[SUFFIX, ""], fim=fim, **settings)
    command = ["generate", "--model", str(checkpoint), "--temperature", "0"]
    command += ["--max-new-tokens", "12"]
    main([*command, "--prompt", PREFIX, "--suffix", SUFFIX])
    assert capsys.readouterr().out == want[0] + "\n"
    file = tmp_path / "infill.jsonl"
    records = [{"prompt": PREFIX, "suffix": SUFFIX}, {"prompt": "y = ", "suffix": ""}]
    file.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    main([*command, "--prompt-file", str(file), "--suffix-file", str(file)])
    assert capsys.readouterr().out == "\n---\n".join(want) + "\n"
    with pytest.raises(SystemExit, match=r"--suffix: 1 suffix\(es\) for 2 prompt\(s\)"):
        main([*command, "--prompt-file", str(file), "--suffix", "x"])
    with pytest.raises(SystemExit, match=r"--suffix-file: 2 suffix\(es\) for 1 prompt\(s\)"):
        main([*command, "--prompt", "x", "--suffix-file", str(file)])


def test_settings_come_from_the_model_or_adapter_folder(checkpoint, tmp_path, capsys):
    plain = tmp_path / "plain"
    write_checkpoint(plain, n_layers=1, d_model=64, n_heads=4, tokenizer=checkpoint)
    command = ["generate", "--prompt", "a", "--suffix", "b", "--max-new-tokens", "2"]
    missing = f"this model was not trained for fill-in-the-middle \\(no fim settings in {plain}"
    with pytest.raises(SystemExit, match=rf"replit-ft generate: {missing}/replit_ft\.json\)"):
        main([*command, "--model", str(plain)])
    write_info(plain, None)
    with pytest.raises(SystemExit, match=missing):
        main([*command, "--model", str(plain)])
    write_info(plain, {**FIM, "middle_id": "49"})
    with pytest.raises(SystemExit, match=r"replit_ft\.json: fim\.middle_id: expected a token id"):
        main([*command, "--model", str(plain)])
    write_info(plain, {**FIM, "middle_id": 40000})
    with pytest.raises(SystemExit, match=r"sentinel ids \[47, 48, 40000\] are not in the model's"):
        main([*command, "--model", str(plain)])
    write_info(plain, {**FIM, "middle_id": PRE})
    with pytest.raises(SystemExit, match=r"the three sentinel ids must differ"):
        main([*command, "--model", str(plain)])

    adapter = tmp_path / "adapter"
    config = LoraConfig(r=4, target_modules=["Wqkv"], init_lora_weights=False)
    get_peft_model(load_model(plain), config).save_pretrained(adapter)
    with pytest.raises(SystemExit, match=f"no fim settings in {adapter}"):
        main([*command, "--model", str(plain), "--adapter", str(adapter)])
    write_info(adapter, {**FIM, "spm_rate": 1.0})
    capsys.readouterr()
    main([*command, "--model", str(plain), "--adapter", str(adapter), "--temperature", "0"])
    tuned, tokenizer = load_for_generation(plain, adapter)
    fim = fim_settings(adapter)
    assert fim.spm_rate == 1.0  # the adapter's, not its base's (which has none)
    want = generate(tuned, tokenizer, ["a"], suffix=["b"], fim=fim, temperature=0, max_new_tokens=2)
    assert capsys.readouterr().out == want[0] + "\n"
