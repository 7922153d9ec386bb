"""The held-out split (prepare), held-out evaluation during training and `openchat-jax eval`: per-class
NLL under every condition equals an independent computation (transformers on the exported weights,
NLL taken in NumPy per conversation, no packing), and the eval step compiles once."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from openchat_jax.cli import main as cli_main
from openchat_jax.data.eval_split import load_eval_split
from openchat_jax.data.prepare import load_dataset_info, prepare
from openchat_jax.data.readers import read_conversations
from openchat_jax.data.config import validate
from openchat_jax.data.template import ConvClass, build_example
from openchat_jax.data.tokenizer import load_tokenizer
from openchat_jax.errors import ConfigError
from openchat_jax.train.loop import build_run, train
from openchat_jax.train.metrics import read_metrics
from tests.test_train_loop import conversations, small_config  # noqa: F401  (pytest fixture)
from tests.tokenizer_fixture import tiny_tokenizer_dir  # noqa: F401  (pytest fixture)


def _config(tok, conv, root: Path, **data):
    config = small_config(tok, [conv], root / "dataset", root / "run")
    config.data.update(**data)
    return config


@pytest.fixture(scope="module")
def with_eval(tiny_tokenizer_dir, conversations, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("with_eval")
    config = _config(tiny_tokenizer_dir, conversations, root, eval_fraction=0.25, eval_seed=3)
    report = prepare(config.data)
    return config, report


def test_eval_fraction_split(with_eval, tiny_tokenizer_dir, conversations, tmp_path):  # noqa: F811
    config, report = with_eval
    dataset = Path(config.data.dataset_dir)
    assert report["held_out"] == 15  # round(0.25 * 60)
    assert report["examples"] + report["held_out"] == report["input_records"] == 60
    ev = report["eval"]
    assert ev["conversations"] == 15 and ev["skipped"] == 0
    assert sum(c["conversations"] for c in ev["classes"].values()) == 15
    info = load_dataset_info(dataset)
    variants = load_eval_split(dataset, info)
    assert [(v.name, v.condition) for v in variants] == [("gpt4", "GPT4"), ("gpt3", "GPT3")]
    held = set(variants[0].origins)
    assert len(held) == 15 and variants[0].origins == variants[1].origins
    # split by conversation: each class's records are either trained on or held out
    labels = [json.loads(line)["model"] for line in conversations.read_text().splitlines()]
    assert report["classes"]["gpt4"]["conversations"] + ev["classes"]["gpt4"]["conversations"] \
        == labels.count("Model: GPT-4")
    assert report["classes"]["gpt3"]["conversations"] + ev["classes"]["gpt3"]["conversations"] \
        == labels.count("Model: GPT-3.5")
    # every rendering is the template of the original record under that condition, weights of its own class
    tokenizer, eot = load_tokenizer(tiny_tokenizer_dir)
    spec = validate(config.data)
    read = read_conversations(spec)
    by_origin = {c.origin: (c, k) for c, k in zip(read.conversations, read.class_ids)}
    for v in variants:
        for tokens, weights, cid, origin in zip(v.tokens, v.weights, v.class_ids, v.origins):
            conv, k = by_origin[origin]
            assert cid == k
            cls = spec.classes[k]
            ex = build_example(tokenizer, eot, conv, ConvClass(cls.name, v.condition, cls.weight), k, spec.max_length)
            np.testing.assert_array_equal(tokens, ex.tokens)
            np.testing.assert_array_equal(weights, ex.weights)
    # deterministic by seed
    again = _config(tiny_tokenizer_dir, conversations, tmp_path / "a", eval_fraction=0.25, eval_seed=3)
    prepare(again.data)
    assert load_eval_split(tmp_path / "a" / "dataset", load_dataset_info(tmp_path / "a" / "dataset"))[0].origins \
        == variants[0].origins
    other = _config(tiny_tokenizer_dir, conversations, tmp_path / "b", eval_fraction=0.25, eval_seed=4)
    prepare(other.data)
    assert set(load_eval_split(tmp_path / "b" / "dataset", load_dataset_info(tmp_path / "b" / "dataset"))[0].origins) != held


def test_eval_files_and_bad_config(tiny_tokenizer_dir, conversations, tmp_path):  # noqa: F811
    lines = conversations.read_text().splitlines()
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("\n".join(lines[:5] + ['{"broken": ']) + "\n")
    config = _config(tiny_tokenizer_dir, conversations, tmp_path, eval_files=[str(test_file)])
    report = prepare(config.data)
    assert report["examples"] == 60 and "held_out" in report and report["held_out"] == 0
    ev = report["eval"]
    assert ev["input_records"] == 6 and ev["conversations"] == 5 and ev["skipped_by_kind"] == {"malformed_json": 1}
    assert ev["skipped_records"][0]["line"] == 6 and ev["skipped_records"][0]["file"] == str(test_file)
    with pytest.raises(ConfigError, match="not both"):
        validate(_config(tiny_tokenizer_dir, conversations, tmp_path, eval_files=[str(test_file)],
                         eval_fraction=0.1).data)
    with pytest.raises(ConfigError, match="data.eval_files"):
        validate(_config(tiny_tokenizer_dir, conversations, tmp_path, eval_files=[str(tmp_path / "nope.jsonl")]).data)
    no_split = _config(tiny_tokenizer_dir, conversations, tmp_path / "c")
    prepare(no_split.data)
    no_split.train.eval_every = 2
    with pytest.raises(Exception, match="no held-out split"):
        build_run(no_split)


def reference_table(hf_dir: Path, dataset: Path) -> dict[str, dict[str, float]]:
    """{rendering: {class: mean NLL of its supervised tokens}}: transformers per conversation, no packing."""
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    info = load_dataset_info(dataset)
    names = [c["name"] for c in info["classes"]]
    out: dict[str, dict[str, float]] = {}
    for v in load_eval_split(dataset, info):
        total, count = np.zeros(len(names)), np.zeros(len(names))
        for tokens, weights, cid in zip(v.tokens, v.weights, v.class_ids):
            with torch.no_grad():
                logits = model(torch.tensor(tokens[None].astype(np.int64))).logits[0].double().numpy()
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - logits.max(-1, keepdims=True)
            t = np.nonzero(weights[1:] > 0)[0]  # position t predicts token t + 1
            total[cid] += -logp[t, tokens[t + 1]].sum()
            count[cid] += len(t)
        out[v.name] = {n: total[c] / count[c] for c, n in enumerate(names) if count[c]}
    return out


@pytest.fixture(scope="module")
def trained(with_eval, tmp_path_factory):
    """5 steps with eval every 2 steps (and at the end); the run, its result and the workdir."""
    import ml_collections

    config = ml_collections.ConfigDict(json.loads(json.dumps(with_eval[0].to_dict())))  # a fresh copy
    workdir = tmp_path_factory.mktemp("trained") / "run"
    config.workdir = str(workdir)
    config.train.update(num_steps=5, eval_every=2, tensorboard=True, peak_flops_per_device=1e12)
    run = build_run(config, devices=jax.devices()[:2])  # sharded over 2 devices (fewer compile faster)
    return config, run, train(config, run=run), workdir


def test_eval_during_training_and_eval_cli_match_transformers(trained, tmp_path):
    config, run, result, workdir = trained
    assert [e["step"] for e in result.eval_history] == [2, 4, 5]  # every 2 steps and at the end
    assert run.eval_hook.evaluator.step._cache_size() == 1  # compiled once for 3 calls x 2 renderings
    rows = [r for r in read_metrics(workdir) if "eval/loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 5]
    last = rows[-1]
    for key in ("eval/accuracy", "eval/class/gpt4/loss", "eval/class/gpt3/loss", "eval/class/gpt3/accuracy",
                "eval/expert_condition/gpt3/loss", "eval/expert_condition/gpt4/accuracy", "eval/seconds"):
        assert key in last, key
    assert rows[0]["eval/loss"] != rows[-1]["eval/loss"]

    from openchat_jax.hf import export_hf

    export_hf(result.final_dir, str(tmp_path / "hf"))
    dataset = Path(config.data.dataset_dir)
    ref = reference_table(tmp_path / "hf", dataset)
    # during training: own condition and expert condition
    assert last["eval/class/gpt4/loss"] == pytest.approx(ref["gpt4"]["gpt4"], rel=1e-4)
    assert last["eval/class/gpt3/loss"] == pytest.approx(ref["gpt3"]["gpt3"], rel=1e-4)
    assert last["eval/expert_condition/gpt3/loss"] == pytest.approx(ref["gpt4"]["gpt3"], rel=1e-4)
    assert last["eval/expert_condition/gpt4/loss"] == pytest.approx(ref["gpt4"]["gpt4"], rel=1e-4)
    # weighted NLL over all classes, own conditions: weights 1.0 / 0.1 on each class's tokens
    stats = load_dataset_info(dataset)["eval"]["classes"]
    w4, w3 = stats["gpt4"]["supervised_tokens"] * 1.0, stats["gpt3"]["supervised_tokens"] * 0.1
    assert last["eval/loss"] == pytest.approx((w4 * ref["gpt4"]["gpt4"] + w3 * ref["gpt3"]["gpt3"]) / (w4 + w3), rel=1e-4)

    # `openchat-jax eval`: every class under every condition, JSON + PNG
    out = tmp_path / "eval"
    assert cli_main(["eval", "--ckpt", result.final_dir, "--data", str(dataset), "--out", str(out),
                     "--mesh", "fsdp=-1"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert (out / "eval.png").stat().st_size > 1000
    for rendering, classes in ref.items():
        for cls, nll in classes.items():
            got = report["likelihood"][rendering][cls]
            assert got["nll"] == pytest.approx(nll, rel=1e-4), (rendering, cls)
            assert got["perplexity"] == pytest.approx(np.exp(nll), rel=1e-4)
    assert cli_main(["eval", "--ckpt", result.final_dir, "--data", str(dataset), "--out", str(tmp_path / "e2"),
                     "--conditions", "GPT3"]) == 0
    assert list(json.loads((tmp_path / "e2" / "eval.json").read_text())["likelihood"]) == ["gpt3"]
    assert cli_main(["eval", "--ckpt", result.final_dir, "--data", str(dataset), "--out", str(tmp_path / "e3"),
                     "--conditions", "GPT5"]) == 2


def test_eval_cli_prompts_exact_match_and_user_scorer(trained, tmp_path, monkeypatch):
    config, _, result, _ = trained
    dataset = config.data.dataset_dir
    questions = ["What is two plus two?", "Hello, how are you today?", "Please write a short poem.",
                 "What is the capital of France?"]
    prompts = tmp_path / "prompts.jsonl"

    def write(refs):
        prompts.write_text("".join(json.dumps({"id": i, "messages": [{"role": "user", "content": q}],
                                               "reference": r}) + "\n" for i, (q, r) in enumerate(zip(questions, refs))))

    def run_eval(out, *extra):
        assert cli_main(["eval", "--ckpt", result.final_dir, "--data", dataset, "--out", str(tmp_path / out),
                         "--prompts", str(prompts), "--max-new-tokens", "4", *extra]) == 0
        return json.loads((tmp_path / out / "eval.json").read_text())["answers"]

    write(["zzz"] * 4)
    first = run_eval("a")
    assert first["scorer"] == "exact_match" and first["records"] == 4
    assert {k: v["score"] for k, v in first["conditions"].items()} == {"gpt4": 0.0, "gpt3": 0.0}
    answers = [json.loads(line)["answers"][-1] for line in (tmp_path / "a" / "answers_gpt4.jsonl").read_text().splitlines()]
    write([f"  {answers[0]} ", answers[1], "zzz", "zzz"])  # greedy: the same answers again; whitespace ignored
    assert run_eval("b")["conditions"]["gpt4"]["score"] == 0.5
    (tmp_path / "my_scores.py").write_text("def is_zzz(answer, reference):\n    return reference == 'zzz'\n")
    monkeypatch.chdir(tmp_path)
    third = run_eval("c", "--scorer", "my_scores:is_zzz")
    assert third["scorer"] == "my_scores:is_zzz" and third["conditions"]["gpt3"]["score"] == 0.5
    prompts.write_text(json.dumps({"id": 0, "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert cli_main(["eval", "--ckpt", result.final_dir, "--data", dataset, "--out", str(tmp_path / "d"),
                     "--prompts", str(prompts)]) == 2  # no reference: an error naming the file and field


def test_eval_batches_hold_every_conversation_once_and_split_between_processes(with_eval):
    from openchat_jax.train.evaluation import local_batches

    config, _ = with_eval
    dataset = Path(config.data.dataset_dir)
    v = load_eval_split(dataset, load_dataset_info(dataset))[1]
    full = local_batches(v, rows=4, seq_len=96, pad_id=0)
    segments = sum(len(np.unique(s[s > 0])) for b in full for s in b["segment_ids"])
    assert segments == len(v.tokens) == 15
    assert sum(b["weights"].sum() for b in full) == pytest.approx(sum(w[1:].sum() for w in v.weights))
    assert sorted(np.concatenate([b["class_ids"][b["segment_ids"] > 0] for b in full]).tolist()) == \
        sorted(np.repeat(v.class_ids, v.lengths).tolist())
    halves = [local_batches(v, rows=4, seq_len=96, pad_id=0, process_index=p, process_count=2) for p in (0, 1)]
    for b, (h0, h1) in enumerate(zip(*halves)):
        for key in full[b]:
            np.testing.assert_array_equal(np.concatenate([h0[key], h1[key]]), full[b][key])
    with pytest.raises(ConfigError, match="longer than the sequence length"):
        local_batches(v, rows=4, seq_len=8, pad_id=0)


@pytest.mark.parametrize("tie", [False, True])
def test_eval_sums_equal_numpy_on_the_logits(tie):
    """Per-class NLL sums of the fused, chunked head equal NumPy's log-softmax of the module's logits,
    with an LM head of its own and with one tied to the embedding (SmolLM2's layout)."""
    import jax.numpy as jnp

    from openchat_jax.model.config import TINY
    from openchat_jax.model.llama import forward, init_params
    from openchat_jax.train.evaluation import eval_sums

    cfg = TINY.replace(vocab_size=64, embed=32, mlp=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       tie_embeddings=tie, dtype="float32")
    params = init_params(cfg, jax.random.key(0))
    assert ("lm_head" in params) != tie
    rng = np.random.default_rng(0)
    B, L = 2, 12
    tokens = rng.integers(0, cfg.vocab_size, (B, L))
    batch = {"tokens": jnp.asarray(tokens), "positions": jnp.tile(jnp.arange(L), (B, 1)),
             "segment_ids": jnp.ones((B, L), jnp.int32), "targets": jnp.asarray(np.roll(tokens, -1, 1)),
             "weights": jnp.asarray(rng.choice([0.0, 1.0, 0.1], (B, L))), "class_ids": jnp.asarray(rng.integers(0, 2, (B, L)))}
    sums = eval_sums(params, cfg, batch, num_classes=2, loss_chunk_length=4)
    logits = np.asarray(forward(params, cfg, batch["tokens"], batch["positions"], batch["segment_ids"]).logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    w, cid = np.asarray(batch["weights"]), np.asarray(batch["class_ids"])
    for c in range(2):
        on = (w > 0) & (cid == c)
        assert float(sums["class_tokens"][c]) == on.sum()
        assert float(sums["class_wce"][c]) == pytest.approx((w * nll)[on].sum(), rel=1e-5)
