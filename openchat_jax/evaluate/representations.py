"""`openchat-jax analyze representations` (the paper's Fig. 4): how far a model's last-layer
representations tell the classes apart.

Each conversation's embedding is the mean, over its tokens (no padding), of the model's last-layer
hidden states after the final norm (`forward(..., head=False).hidden`, what transformers returns
as `hidden_states[-1]` for Llama). Numbers: the held-out accuracy of a linear probe predicting the
class from the embedding (multinomial logistic regression, fitted by gradient descent on
standardised features of a stratified training part, scored on the rest) and the silhouette score
of the classes (Euclidean). The 2-D picture is UMAP when `umap-learn` is importable, PCA otherwise.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from openchat_jax.errors import ConfigError, DataError
from openchat_jax.model.config import LlamaConfig
from openchat_jax.model.llama import forward


def load_conversations(dataset_dir: str | Path, info: Mapping[str, Any], *, split: str, condition: str | None = None,
                       max_conversations: int = 0, max_per_class: int = 0,
                       seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """(token arrays, class ids). split "eval": the held-out split, each conversation under its own
    class's condition, or all under `condition` (a class name); "train": the prepared training set.
    `max_per_class > 0` / `max_conversations > 0` keep a random subset (by `seed`) of at most that
    many per class / in all, in dataset order."""
    if split == "eval":
        from openchat_jax.data.eval_split import load_eval_split, variant_for_class

        variants = load_eval_split(dataset_dir, dict(info))
        classes = info["classes"]
        if condition is not None:
            v = variant_for_class(variants, classes, condition)
            tokens, class_ids = list(v.tokens), v.class_ids
        else:
            own = [variant_for_class(variants, classes, c["name"]) for c in classes]
            class_ids = variants[0].class_ids
            tokens = [own[k].tokens[i] for i, k in enumerate(class_ids.tolist())]
    elif split == "train":
        if condition is not None:
            raise ConfigError("--condition needs the held-out split (--split eval): the training set is "
                              "stored under each conversation's own condition only")
        from openchat_jax.data.prepare import INDEX_FILE
        from openchat_jax.data.tfds_builder import open_data_source

        with np.load(Path(dataset_dir) / INDEX_FILE) as index:
            class_ids = index["class_ids"].astype(np.int32)
        keep = _subset(class_ids, max_conversations, max_per_class, seed)
        source = open_data_source(Path(dataset_dir))
        tokens = [np.asarray(source[int(i)]["tokens"]) for i in keep]
        return tokens, class_ids[keep]
    else:
        raise ConfigError(f"split {split!r}: choose eval or train")
    keep = _subset(np.asarray(class_ids), max_conversations, max_per_class, seed)
    return [tokens[i] for i in keep], np.asarray(class_ids)[keep]


def _subset(class_ids: np.ndarray, max_items: int, max_per_class: int, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(len(class_ids))
    if max_per_class > 0:
        rank = np.zeros(len(order), np.int64)  # position of each item among its class, in `order`
        for c in np.unique(class_ids):
            mine = order[class_ids[order] == c]
            rank[mine] = np.arange(len(mine))
        order = order[rank[order] < max_per_class]
    if max_items > 0:
        order = order[:max_items]
    return np.sort(order)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _mean_pooled(params: Any, tokens_BxL: jax.Array, lengths_B: jax.Array, cfg: LlamaConfig) -> jax.Array:
    L = tokens_BxL.shape[1]
    mask_BxL = jnp.arange(L)[None, :] < lengths_B[:, None]
    positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), tokens_BxL.shape)
    x_BxLxE = forward(params, cfg, tokens_BxL, positions_BxL, mask_BxL.astype(jnp.int32), head=False).hidden
    summed_BxE = jnp.einsum("ble,bl->be", x_BxLxE.astype(jnp.float32), mask_BxL.astype(jnp.float32))
    return summed_BxE / jnp.maximum(lengths_B, 1)[:, None].astype(jnp.float32)


def embed(params: Any, cfg: LlamaConfig, sequences: Sequence[np.ndarray], *, seq_len: int, batch_size: int = 16,
          pad_id: int = 0) -> np.ndarray:
    """Mean-pooled last-layer states [N, E] (float32), `batch_size` padded rows of `seq_len` at a time
    (one compiled shape)."""
    longest = max(len(s) for s in sequences)
    if longest > seq_len:
        raise DataError(f"a conversation has {longest} tokens, more than the sequence length {seq_len}")
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        tokens = np.full((batch_size, seq_len), pad_id, np.int32)
        lengths = np.zeros((batch_size,), np.int32)
        for b, s in enumerate(chunk):
            tokens[b, :len(s)] = s
            lengths[b] = len(s)
        out.append(np.asarray(_mean_pooled(params, tokens, lengths, cfg))[:len(chunk)])
    return np.concatenate(out)


def pca_2d(x_NxE: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the first two principal components' scores [N, 2], their explained-variance ratios [2])."""
    centered = x_NxE - x_NxE.mean(axis=0)
    _, s, vt = np.linalg.svd(centered, full_matrices=False)
    var = s ** 2
    return centered @ vt[:2].T, var[:2] / var.sum()


def project_2d(x_NxE: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates and the method used: "umap" (umap-learn) or "pca"; "auto" = UMAP if importable."""
    if method not in ("auto", "umap", "pca"):
        raise ConfigError(f"projection {method!r}: choose auto, umap or pca")
    if method in ("auto", "umap"):
        try:
            import umap
        except ImportError:
            if method == "umap":
                raise ConfigError("projection umap: umap-learn is not installed (pip install umap-learn)") from None
        else:
            return umap.UMAP(n_components=2, random_state=seed).fit_transform(x_NxE), "umap"
    return pca_2d(x_NxE)[0], "pca"


def silhouette(x_NxE: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette coefficient, Euclidean: s_i = (b_i - a_i) / max(a_i, b_i), a_i the mean distance
    to the other members of i's class, b_i the smallest mean distance to another class; 0 for a
    class of one point (the usual convention)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if not 2 <= len(classes) < len(labels):
        raise DataError(f"silhouette needs 2 <= classes < points, got {len(classes)} classes, {len(labels)} points")
    sq = (x_NxE ** 2).sum(axis=1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x_NxE @ x_NxE.T, 0.0))
    np.fill_diagonal(dist, 0.0)
    member = labels[:, None] == classes[None, :]  # [N, C]
    sums = dist @ member  # [N, C]: distance from i to every member of class c
    counts = member.sum(axis=0)
    own = member.argmax(axis=1)
    own_count = counts[own] - 1
    a = np.where(own_count > 0, sums[np.arange(len(labels)), own] / np.maximum(own_count, 1), 0.0)
    mean_other = sums / counts[None, :]
    mean_other[np.arange(len(labels)), own] = np.inf
    b = mean_other.min(axis=1)
    s = np.where(own_count > 0, (b - a) / np.maximum(np.maximum(a, b), 1e-30), 0.0)
    return float(s.mean())


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): `test_fraction` of each class (at least one) in the test part."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.nonzero(labels == c)[0])
        k = max(1, int(round(test_fraction * len(idx)))) if len(idx) > 1 else 0
        test.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.asarray(train, np.int64)), np.sort(np.asarray(test, np.int64))


def fit_probe(x_NxE: np.ndarray, y_N: np.ndarray, num_classes: int, *, l2: float = 1e-3, steps: int = 500,
              lr: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Multinomial logistic regression by full-batch gradient descent on standardised features:
    (mean, scale, W [E, C], bias [C])."""
    mean, scale = x_NxE.mean(axis=0), x_NxE.std(axis=0) + 1e-8
    z = (x_NxE - mean) / scale
    onehot = np.eye(num_classes)[y_N]
    w = np.zeros((z.shape[1], num_classes))
    bias = np.zeros(num_classes)
    for _ in range(steps):
        logits = z @ w + bias
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        g = (p - onehot) / len(z)
        w -= lr * (z.T @ g + l2 * w)
        bias -= lr * g.sum(axis=0)
    return mean, scale, w, bias


def probe_accuracy(x_NxE: np.ndarray, labels: np.ndarray, *, test_fraction: float = 0.3, seed: int = 0) -> dict[str, float]:
    """Held-out accuracy of a linear probe predicting the class, and the majority-class baseline."""
    labels = np.asarray(labels)
    classes, y = np.unique(labels, return_inverse=True)
    train, test = stratified_split(y, test_fraction, seed)
    if len(test) == 0 or len(np.unique(y[train])) < 2:
        raise DataError(f"too few conversations for a probe: {len(train)} to fit, {len(test)} to test")
    mean, scale, w, bias = fit_probe(x_NxE[train], y[train], len(classes))
    predict = lambda idx: (((x_NxE[idx] - mean) / scale) @ w + bias).argmax(axis=1)  # noqa: E731
    majority = np.bincount(y[train], minlength=len(classes)).argmax()
    return {
        "probe_test_accuracy": float((predict(test) == y[test]).mean()),
        "probe_train_accuracy": float((predict(train) == y[train]).mean()),
        "majority_baseline": float((y[test] == majority).mean()),
        "probe_train_conversations": int(len(train)),
        "probe_test_conversations": int(len(test)),
    }


Panel = tuple[np.ndarray, Sequence[str], str]  # 2-D coordinates [N, 2], class name of each point, title


def plot(panels: Sequence[Panel], path: str | Path) -> Path:
    """One scatter plot per panel, points coloured by class (the same colour for a class throughout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(n for _, labels, _ in panels for n in labels))
    colors = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (coords, labels, title) in zip(axes[0], panels):
        labels = np.asarray(labels)
        for name in names:
            pts = coords[labels == name]
            if len(pts):
                ax.scatter(pts[:, 0], pts[:, 1], s=5, alpha=0.6, color=colors[name], label=f"{name} ({len(pts)})")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def plot_saved(out_dirs: Sequence[str | Path], path: str | Path, titles: Sequence[str] | None = None) -> Path:
    """Several `analyze representations` outputs side by side (their embeddings.npz and JSON)."""
    panels = []
    for i, d in enumerate(out_dirs):
        saved = np.load(Path(d) / "embeddings.npz")
        result = json.loads((Path(d) / "representations.json").read_text())
        title = titles[i] if titles else Path(d).name
        title += f"\nprobe {result['probe_test_accuracy']:.2f} (majority {result['majority_baseline']:.2f}), " \
                 f"silhouette {result['silhouette']:.2f}"
        panels.append((saved["coords"], [str(x) for x in saved["labels"]], title))
    return plot(panels, path)


def analyze_representations(ckpt: str, data: str, out_dir: str | Path, *, split: str | None = None,
                            condition: str | None = None, max_conversations: int = 2000, max_per_class: int = 0,
                            projection: str = "auto", probe_test_fraction: float = 0.3, batch_size: int = 16,
                            seed: int = 0, dtype: str | None = None) -> dict[str, Any]:
    """The whole `analyze representations` command (module docstring); writes OUT/representations.json,
    OUT/representations.png and OUT/embeddings.npz and returns the JSON's content. `split` None: the
    held-out split when the dataset has one, else the training set."""
    from openchat_jax.data.prepare import load_dataset_info
    from openchat_jax.evaluate.checkpoint import check_vocabulary
    from openchat_jax.model import checkpoint_io

    if not 0 < probe_test_fraction < 1:
        raise ConfigError(f"--probe-test-fraction must be in (0, 1), got {probe_test_fraction}")
    info = load_dataset_info(data)
    split = split or ("eval" if info.get("eval") else "train")
    tokens, class_ids = load_conversations(data, info, split=split, condition=condition,
                                           max_conversations=max_conversations, max_per_class=max_per_class, seed=seed)
    names = [c["name"] for c in info["classes"]]
    params, cfg = checkpoint_io.load_params(ckpt)
    if dtype:
        cfg = cfg.replace(dtype=dtype)
    check_vocabulary(cfg, info, ckpt, data)
    x = embed(jax.device_put(params), cfg, tokens, seq_len=int(info["max_length"]), batch_size=batch_size,
              pad_id=int(info.get("pad_id", 0)))
    labels = [names[k] for k in class_ids.tolist()]
    coords, method = project_2d(x, projection, seed)
    result = {
        "ckpt": ckpt, "data": data, "split": split, "condition": condition or "own",
        "conversations": {n: labels.count(n) for n in names if n in labels},
        "embedding": "mean over each conversation's tokens of the last-layer hidden states (after the final norm)",
        "projection": method,
        **probe_accuracy(x, class_ids, test_fraction=probe_test_fraction, seed=seed),
        "silhouette": silhouette(x, class_ids),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "embeddings.npz", embeddings=x, class_ids=class_ids, labels=np.asarray(labels), coords=coords)
    (out / "representations.json").write_text(json.dumps(result, indent=1))
    title = (f"{Path(ckpt.rstrip('/')).name}: {method.upper()} of mean-pooled last-layer states\n"
             f"probe acc {result['probe_test_accuracy']:.3f}, silhouette {result['silhouette']:.3f}")
    plot([(coords, labels, title)], out / "representations.png")
    return result
