"""`openchat-jax analyze representations`: the silhouette score against a hand-computed case, PCA
against the covariance's eigenvectors, the linear probe on separable and on random labels, and the
embeddings of the CLI against transformers' last hidden states."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from openchat_jax.cli import main as cli_main
from openchat_jax.data.eval_split import load_eval_split
from openchat_jax.data.prepare import load_dataset_info, prepare
from openchat_jax.data.tokenizer import load_tokenizer
from openchat_jax.errors import DataError
from openchat_jax.evaluate.representations import pca_2d, probe_accuracy, project_2d, silhouette
from tests import hf_fixtures
from tests.test_train_loop import conversations, small_config  # noqa: F401  (pytest fixture)
from tests.tokenizer_fixture import tiny_tokenizer_dir  # noqa: F401  (pytest fixture)


def test_silhouette_hand_computed():
    # class A at 0 and 2, class B at 5 and 6 (1-D):
    #   x=0: a=2, b=(5+6)/2=5.5 -> 3.5/5.5      x=2: a=2, b=(3+4)/2=3.5 -> 1.5/3.5
    #   x=5: a=1, b=(5+3)/2=4   -> 3/4          x=6: a=1, b=(6+4)/2=5   -> 4/5
    x = np.array([[0.0], [2.0], [5.0], [6.0]])
    expected = (3.5 / 5.5 + 1.5 / 3.5 + 3 / 4 + 4 / 5) / 4
    assert silhouette(x, np.array([0, 0, 1, 1])) == pytest.approx(expected, rel=1e-12)
    # a class of one point scores 0 there: x=9 alone; x=0: a=2, b=9 -> 7/9; x=2: a=2, b=7 -> 5/7
    assert silhouette(np.array([[0.0], [2.0], [9.0]]), np.array([0, 0, 1])) == pytest.approx((7 / 9 + 5 / 7 + 0) / 3)
    with pytest.raises(DataError):
        silhouette(x, np.zeros(4, int))


def test_pca_matches_covariance_eigenvectors():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 3.0
    coords, ratio = pca_2d(x)
    evals, evecs = np.linalg.eigh(np.cov(x, rowvar=False))
    top = evecs[:, ::-1][:, :2]
    expected = (x - x.mean(0)) @ top
    for k in range(2):  # up to sign
        assert abs(np.corrcoef(coords[:, k], expected[:, k])[0, 1]) == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(ratio, evals[::-1][:2] / evals.sum(), rtol=1e-9)
    assert project_2d(x, "pca")[1] == "pca"


def test_probe_separable_and_random():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 60)
    means = rng.normal(size=(3, 10)) * 4
    x = means[y] + rng.normal(size=(180, 10))
    got = probe_accuracy(x, y, test_fraction=0.3, seed=0)
    assert got["probe_test_accuracy"] == 1.0 and got["probe_test_conversations"] == 54
    random_labels = rng.permutation(np.repeat([0, 1], 150))
    noise = rng.normal(size=(300, 10))
    got = probe_accuracy(noise, random_labels, test_fraction=0.3, seed=0)
    assert 0.3 < got["probe_test_accuracy"] < 0.7 and got["majority_baseline"] == 0.5


def test_cli_embeddings_match_transformers(tiny_tokenizer_dir, conversations, tmp_path):  # noqa: F811
    import torch
    import transformers

    from openchat_jax.hf import import_hf

    config = small_config(tiny_tokenizer_dir, [conversations], tmp_path / "dataset", tmp_path / "run")
    config.data.eval_fraction = 0.5
    prepare(config.data)
    vocab = len(load_tokenizer(tiny_tokenizer_dir)[0])
    hf_dir = hf_fixtures.make_hf_checkpoint(tmp_path / "hf", vocab_size=vocab)
    import_hf(str(hf_dir), str(tmp_path / "ckpt"))
    out = tmp_path / "rep"
    assert cli_main(["analyze", "representations", "--ckpt", str(tmp_path / "ckpt"), "--data",
                     str(tmp_path / "dataset"), "--out", str(out), "--batch-size", "8", "--dtype", "float32"]) == 0
    result = json.loads((out / "representations.json").read_text())
    assert result["split"] == "eval" and result["projection"] in ("pca", "umap")
    assert 0 <= result["probe_test_accuracy"] <= 1 and -1 <= result["silhouette"] <= 1
    assert (out / "representations.png").stat().st_size > 1000
    saved = np.load(out / "embeddings.npz")
    info = load_dataset_info(tmp_path / "dataset")
    variants = {v.name: v for v in load_eval_split(tmp_path / "dataset", info)}
    names = [c["name"] for c in info["classes"]]
    assert sum(result["conversations"].values()) == len(saved["class_ids"]) == info["eval"]["conversations"] == 30
    model = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    for i, cid in enumerate(saved["class_ids"].tolist()):
        tokens = variants[names[cid]].tokens[i]  # each conversation under its own class's condition
        with torch.no_grad():
            hidden = model(torch.tensor(tokens[None].astype(np.int64)), output_hidden_states=True).hidden_states[-1]
        np.testing.assert_allclose(saved["embeddings"][i], hidden[0].mean(0).numpy(), rtol=2e-4, atol=2e-5)
    # every conversation under the expert condition
    assert cli_main(["analyze", "representations", "--ckpt", str(tmp_path / "ckpt"), "--data",
                     str(tmp_path / "dataset"), "--out", str(tmp_path / "rep2"), "--condition", "gpt4",
                     "--projection", "pca", "--split", "eval", "--max-per-class", "5"]) == 0
    second = json.loads((tmp_path / "rep2" / "representations.json").read_text())
    assert second["condition"] == "gpt4" and second["conversations"] == {"gpt4": 5, "gpt3": 5}
    from openchat_jax.evaluate.representations import plot_saved

    assert plot_saved([out, tmp_path / "rep2"], tmp_path / "both.png").stat().st_size > 1000
    # a model whose vocabulary is smaller than the dataset's tokenizer: an error, not clamped ids
    import_hf(str(hf_fixtures.make_hf_checkpoint(tmp_path / "hf_small")), str(tmp_path / "small"))
    assert cli_main(["analyze", "representations", "--ckpt", str(tmp_path / "small"), "--data",
                     str(tmp_path / "dataset"), "--out", str(tmp_path / "rep3")]) == 2
