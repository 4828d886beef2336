"""Merge fidelity: attention-output error of one KV compression round on real SmolLM2 states.

What it measures
----------------
How much one round that frees ``k`` KV slots changes the attention output seen by *later*
queries, for three ways of freeing the same ``k`` slots of one layer's cache:

* ``kvslimmer``: :func:`kvslimmer_vllm.core.merge_round` (Hessian key weights, RoPE-aware);
* ``average``: :func:`kvslimmer_vllm.core.merge_round` with ``key_weights="count"``, the same pairs merged with plain
  count-weighted keys (the same values, counts and positions; only the key weights differ);
* ``evict``: :func:`kvslimmer_vllm.core.evict_lowest`, dropping the ``k`` slots with the lowest
  observation mass.

Procedure (deterministic: no sampling anywhere; ``--seed`` only fixes which topics form the texts)
-------------------------------------------------------------------------------------------------
1. Texts. CPython's own documentation strings, ``pydoc_data.topics.topics`` (local, no
   download). The sorted topic names are shuffled with ``random.Random(seed)``; text 1
   concatenates topics in that order (separated by blank lines) until it holds ``--tokens``
   tokens and is cut to exactly that many, text 2 continues with the next unused topic, and so
   on, so the texts share no topic. The topic names used are written to the report. (The
   topics differ between Python versions; the report records the version.)
2. States. The default model (``kvslimmer_vllm.models.fetch_model()``, float32, eager
   attention) runs once over each text. For every selected layer the script records the
   query, key and value tensors that the layer's eager attention function receives, i.e.
   post-RoPE queries ``[T, Hq, D]``, post-RoPE keys and values ``[T, Hkv, D]``: exactly what
   the model attends with. This is done by wrapping the attention function of the model's
   modeling module for the duration of the forward pass. Two checks run once, on the first
   text, and abort the run if they fail: (a) for every captured layer,
   ``merged_attention(q, k, v, counts=None, scale=D**-0.5, visible=causal)`` reproduces the
   model's own attention output (the input of ``o_proj``, read by a forward pre-hook) to
   1e-4 relative; (b) for one layer, the ``RotarySpec`` used for merging, built from the
   config's RoPE theta, maps the layer's ``k_proj`` output onto the captured post-RoPE keys
   (checks theta and neox pairing).
3. Split. With ``T`` tokens and ``H = --heldout``, the cache is the first ``C = T - H``
   tokens. The observation queries are the last ``W = --window`` queries of the cache part
   (positions ``C - W .. C - 1``), the queries "since the last round"; their causal
   attention mass over the ``C`` cache slots (``merged_attention(..., return_mass=True)``)
   is the round's ``mass``. First round: counts 1, hess NaN, ``round_idx = 1``,
   positions ``0 .. C - 1``.
4. Round. Sink 32 (the reference and engine default), recent 0: the engine protects its
   newest slots, but here the whole cache after the sink is open to compression so that
   the benchmark evaluates the method on all of it. The mergeable region holds
   ``|M| = C - 32`` slots; for a removed fraction ``f`` the round frees
   ``k = round(f |M|)`` slots (``k`` merged pairs, or ``k`` evicted slots), so all methods
   end with ``C - k`` slots. Merging uses RoPE-aware keys with
   ``RotarySpec(rotary_dim=D, is_neox=True, inv_freq=default_inv_freq(D, theta))`` and the
   defaults ``DEFAULT_GAMMA = 4096 / ln 512`` and ``DEFAULT_EPS = 1e-21``.
5. Error. The ``H`` held-out queries (positions ``C .. T - 1``) attend, causally, to the
   compressed cache (merged slots carry their counts as the ``log(count)`` bias) followed by
   the held-out tokens' own keys and values, which are not compressed, as in decoding after a
   round. (``--cache-only`` lets them attend to the compressed cache alone instead, which
   isolates the cache and gives larger relative errors.) The reference is the same attention
   over the uncompressed cache. Per text and layer,
   ``rel_error = ||out_c - out_full||_F / ||out_full||_F`` over ``[H, Hq, D]``.
6. Summary. Mean of ``rel_error`` over all (text, layer) rows; median over layers of the
   per-layer mean over texts; ratio of each method's mean to KVSlimmer's. The error is that of
   one attention layer fed the true (uncompressed-model) states; it does not propagate through
   later layers.

Outputs in ``--out`` (default ``results/merge_fidelity/``): ``merge_fidelity.csv`` (one row per
text, layer, method and fraction), ``merge_fidelity.md`` (tables, command line, model, sizes,
machine) and ``merge_fidelity.png`` (mean error against removed fraction, log y).

Usage::

    python benchmarks/merge_fidelity.py [--tokens 1200] [--heldout 128] [--window 256]
        [--layers all|0,5,10|0-9] [--texts 3] [--out results/merge_fidelity] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kvslimmer_vllm.core import (
    RotarySpec,
    default_inv_freq,
    evict_lowest,
    merge_round,
    merged_attention,
)
from kvslimmer_vllm.core.config import DEFAULT_EPS, DEFAULT_GAMMA

FRACTIONS = (0.10, 0.25, 0.45)
METHODS = ("kvslimmer", "average", "evict")
SINK = 32
RECENT = 0
CAPTURE_TOL = 1e-4


def log(msg: str, end: str = "\n") -> None:
    print(msg, end=end, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------- texts
def build_texts(tokenizer, n_texts: int, n_tokens: int, seed: int) -> list[tuple[list[int], list[str]]]:
    """``n_texts`` disjoint texts of exactly ``n_tokens`` token ids, with the topics used."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    random.Random(seed).shuffle(names)
    texts, pos = [], 0
    for _ in range(n_texts):
        used: list[str] = []
        ids: list[int] = []
        while len(ids) < n_tokens:
            if pos >= len(names):
                raise SystemExit(
                    f"pydoc topics exhausted: {n_texts} texts of {n_tokens} tokens need more text"
                )
            used.append(names[pos])
            pos += 1
            text = "\n\n".join(topics[name].strip() for name in used)
            ids = tokenizer(text)["input_ids"]
        texts.append((ids[:n_tokens], used))
    return texts


# ------------------------------------------------------------------------------------- capture
@dataclass
class LayerStates:
    """One layer's states for one text, token-major."""

    query: torch.Tensor  # [T, Hq, D], post-RoPE
    key: torch.Tensor  # [T, Hkv, D], post-RoPE
    value: torch.Tensor  # [T, Hkv, D]
    scaling: float
    attn_out: torch.Tensor | None = None  # [T, Hq, D], the model's own (input of o_proj)
    key_pre_rope: torch.Tensor | None = None  # [T, Hkv, D], k_proj output (rope check layer)


@contextlib.contextmanager
def capture_attention(model, layers: list[int], with_outputs: bool, rope_layer: int | None):
    """Record what each selected layer's eager attention function receives.

    Wraps ``eager_attention_forward`` of the model's modeling module (looked up at call time by
    the attention modules) and, when ``with_outputs``, adds forward pre-hooks on ``o_proj`` (the
    model's attention output) and a forward hook on ``k_proj`` of ``rope_layer``.
    """
    attn_modules = [layer.self_attn for layer in model.model.layers]
    modeling = sys.modules[type(attn_modules[0]).__module__]
    original = modeling.eager_attention_forward
    wanted = set(layers)
    states: dict[int, LayerStates] = {}
    pre_rope: dict[int, torch.Tensor] = {}

    def wrapped(module, query, key, value, attention_mask, scaling, *args, **kwargs):
        if module.layer_idx in wanted:
            states[module.layer_idx] = LayerStates(
                query=query[0].transpose(0, 1).clone(),
                key=key[0].transpose(0, 1).clone(),
                value=value[0].transpose(0, 1).clone(),
                scaling=float(scaling),
                key_pre_rope=pre_rope.pop(module.layer_idx, None),
            )
        return original(module, query, key, value, attention_mask, scaling, *args, **kwargs)

    handles = []
    if with_outputs:
        for idx in layers:
            attn = attn_modules[idx]

            def pre_o_proj(_mod, inputs, idx=idx, attn=attn):
                out = inputs[0][0]  # [T, Hq * D]
                states[idx].attn_out = out.view(out.shape[0], -1, attn.head_dim).clone()

            handles.append(attn.o_proj.register_forward_pre_hook(pre_o_proj))
        if rope_layer is not None:
            attn = attn_modules[rope_layer]

            def post_k_proj(_mod, _inputs, output, attn=attn):
                # k_proj runs before the attention function, so keep it aside until then.
                pre_rope[rope_layer] = output[0].view(output.shape[1], -1, attn.head_dim).clone()

            handles.append(attn.k_proj.register_forward_hook(post_k_proj))

    modeling.eager_attention_forward = wrapped
    try:
        yield states
    finally:
        modeling.eager_attention_forward = original
        for handle in handles:
            handle.remove()


def run_model(model, ids: list[int], layers, with_outputs: bool, rope_layer: int | None):
    with capture_attention(model, layers, with_outputs, rope_layer) as states, torch.inference_mode():
        model(torch.tensor([ids]), use_cache=False)
    missing = [idx for idx in layers if idx not in states]
    if missing:
        raise RuntimeError(
            f"no attention states captured for layers {missing}: this transformers version "
            "does not route eager attention through the modeling module's eager_attention_forward"
        )
    return states


def rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    diff = (approx.double() - exact.double()).norm()
    return float(diff / exact.double().norm())


def verify_capture(states: dict[int, LayerStates], rotary: RotarySpec, rope_layer: int) -> float:
    """Checks (a) and (b) of the module docstring; returns the worst attention mismatch."""
    worst = 0.0
    for idx, st in sorted(states.items()):
        head_dim = st.query.shape[-1]
        if not math.isclose(st.scaling, head_dim**-0.5, rel_tol=1e-6):
            raise AssertionError(f"layer {idx}: model scaling {st.scaling} != D**-0.5")
        visible = torch.arange(1, st.query.shape[0] + 1)
        ours = merged_attention(
            st.query, st.key, st.value, None, scale=head_dim**-0.5, visible=visible
        )
        err = rel_error(ours, st.attn_out)
        worst = max(worst, err)
        assert err < CAPTURE_TOL, (
            f"capture check failed: layer {idx}: merged_attention differs from the model's "
            f"attention output by {err:.2e} relative (tolerance {CAPTURE_TOL})"
        )
    st = states[rope_layer]
    rotated = rotary.rotate(st.key_pre_rope, torch.arange(st.key.shape[0]))
    err = rel_error(rotated, st.key)
    assert err < CAPTURE_TOL, (
        f"RoPE check failed: layer {rope_layer}: RotarySpec(k_proj output) differs from the "
        f"captured post-RoPE keys by {err:.2e} relative"
    )
    return worst


# ----------------------------------------------------------------------------------- one layer
def evaluate_layer(
    st: LayerStates, heldout: int, window: int, rotary: RotarySpec, cache_only: bool
) -> list[tuple[str, float, int, float, float | None]]:
    """All methods and fractions for one layer: ``(method, f, k, rel_error, fallback_rate)``."""
    num_tokens, _, head_dim = st.query.shape
    scale = head_dim**-0.5
    cache = num_tokens - heldout
    q_obs = st.query[cache - window : cache]
    keys, values = st.key[:cache], st.value[:cache]
    _, mass = merged_attention(
        q_obs, keys, values, None, scale=scale,
        visible=torch.arange(cache - window + 1, cache + 1), return_mass=True,
    )
    state = dict(
        keys=keys,
        values=values,
        counts=torch.ones(cache, dtype=keys.dtype),
        positions=torch.arange(cache, dtype=torch.int64),
        hess=torch.full((cache, keys.shape[1]), float("nan"), dtype=keys.dtype),
        mass=mass.to(keys.dtype),
    )

    q_held = st.query[cache:]
    own_k, own_v = st.key[cache:], st.value[cache:]
    steps = torch.arange(1, heldout + 1)

    def heldout_output(c_keys, c_values, c_counts):
        n = c_keys.shape[0]
        if cache_only:
            return merged_attention(q_held, c_keys, c_values, c_counts, scale=scale)
        return merged_attention(
            q_held,
            torch.cat([c_keys, own_k]),
            torch.cat([c_values, own_v]),
            torch.cat([c_counts, torch.ones(heldout, dtype=c_counts.dtype)]),
            scale=scale,
            visible=n + steps,
        )

    full = heldout_output(keys, values, state["counts"])
    region = cache - SINK - RECENT
    merge_args = dict(
        sink=SINK, recent=RECENT, round_idx=1, gamma=DEFAULT_GAMMA, eps=DEFAULT_EPS, rotary=rotary
    )
    rows = []
    for frac in FRACTIONS:
        k = round(frac * region)
        results = {
            "kvslimmer": merge_round(**state, k=k, **merge_args),
            "average": merge_round(**state, k=k, key_weights="count", **merge_args),
            "evict": evict_lowest(**state, sink=SINK, recent=RECENT, k=k),
        }
        for method in METHODS:
            res = results[method]
            assert res.keys.shape[0] == cache - k
            err = rel_error(heldout_output(res.keys, res.values, res.counts), full)
            fallback = None
            if res.key_fallback is not None:
                fallback = float(res.key_fallback.float().mean())
            rows.append((method, frac, k, err, fallback))
    return rows


# ------------------------------------------------------------------------------------- reports
def summarize(rows: list[dict]) -> dict[tuple[str, float], tuple[float, float]]:
    """``(method, f) -> (mean over texts and layers, median over layers of per-layer means)``."""
    out = {}
    for method in METHODS:
        for frac in FRACTIONS:
            sel = [r for r in rows if r["method"] == method and r["fraction"] == frac]
            per_layer: dict[int, list[float]] = {}
            for r in sel:
                per_layer.setdefault(r["layer"], []).append(r["rel_error"])
            layer_means = [statistics.fmean(v) for v in per_layer.values()]
            out[method, frac] = (statistics.fmean(r["rel_error"] for r in sel),
                                 statistics.median(layer_means))
    return out


def format_tables(summary, ks: dict[float, list[int]], fallback: dict[float, list[float]]) -> str:
    cols = [f"{round(f * 100)}%" for f in FRACTIONS]
    lines = [
        "Relative attention-output error on held-out queries: mean over texts x layers "
        "(median over layers)",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for method in METHODS:
        cells = [f"{summary[method, f][0]:.4g} ({summary[method, f][1]:.4g})" for f in FRACTIONS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Ratio of mean error to KVSlimmer's",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for method in METHODS:
        cells = [f"{summary[method, f][0] / summary['kvslimmer', f][0]:.3f}" for f in FRACTIONS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    k_desc = ", ".join(
        f"{round(f * 100)}%: k = {'/'.join(str(k) for k in sorted(set(ks[f])))}" for f in FRACTIONS
    )
    fb_desc = ", ".join(
        f"{round(f * 100)}%: {100 * statistics.fmean(fallback[f]):.2f}%" for f in FRACTIONS
    )
    lines += [
        "",
        f"Slots removed per layer: {k_desc}.",
        f"KVSlimmer pairs x heads whose Hessian key weights fell back to count weights: {fb_desc}.",
    ]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = ["text", "layer", "method", "fraction", "k", "rel_error"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "rel_error": f"{r['rel_error']:.6e}"})


def write_plot(path: Path, summary, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [100 * f for f in FRACTIONS]
    for method in METHODS:
        ax.plot(xs, [summary[method, f][0] for f in FRACTIONS], marker="o", label=method)
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xlabel("removed fraction of the mergeable region (%)")
    ax.set_ylabel("mean relative attention-output error")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------- main
def parse_layers(spec: str, num_layers: int) -> list[int]:
    if spec == "all":
        return list(range(num_layers))
    layers: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        layers.update(range(int(lo), int(hi or lo) + 1))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise SystemExit(f"--layers: need layer indices in [0, {num_layers}), got {spec!r}")
    return sorted(layers)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1200, help="tokens per text (default 1200)")
    p.add_argument("--heldout", type=int, default=128, help="held-out queries H (default 128)")
    p.add_argument("--window", type=int, default=256, help="observation queries W (default 256)")
    p.add_argument("--layers", default="all", help="'all', or e.g. '0,5,10' or '0-9'")
    p.add_argument("--texts", type=int, default=3, help="number of texts (default 3)")
    p.add_argument("--out", type=Path, default=Path("results/merge_fidelity"))
    p.add_argument("--seed", type=int, default=0, help="order of the pydoc topics (default 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--cache-only", action="store_true",
                   help="held-out queries attend to the compressed cache only, not to their own keys")
    args = p.parse_args(argv)
    cache = args.tokens - args.heldout
    if args.heldout < 1 or args.window < 1 or args.texts < 1:
        p.error("--heldout, --window and --texts must be positive")
    if args.window > cache:
        p.error(f"--window ({args.window}) exceeds the cache part T - H = {cache}")
    if cache - SINK - RECENT < 4:
        p.error(f"cache part T - H = {cache} is too short for sink {SINK} and recent {RECENT}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvslimmer_vllm.models import fetch_model

    model_path = fetch_model(log=log)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    config = model.config
    layers = parse_layers(args.layers, config.num_hidden_layers)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    if rope.get("rope_type", "default") != "default":
        raise SystemExit(f"RoPE scaling {rope.get('rope_type')!r} is not handled by this benchmark")
    rotary = RotarySpec(rotary_dim=head_dim, is_neox=True, inv_freq=default_inv_freq(head_dim, theta))
    rope_layer = layers[len(layers) // 2]

    texts = build_texts(tokenizer, args.texts, args.tokens, args.seed)
    rows: list[dict] = []
    fallback: dict[float, list[float]] = {f: [] for f in FRACTIONS}
    capture_err = None
    for t_idx, (ids, _topics) in enumerate(texts):
        tag = f"[text {t_idx + 1}/{len(texts)}]"
        log(f"{tag} forward pass over {len(ids)} tokens")
        first = t_idx == 0
        states = run_model(model, ids, layers, with_outputs=first, rope_layer=rope_layer if first else None)
        if first:
            capture_err = verify_capture(states, rotary, rope_layer)
            log(f"{tag} capture check passed: merged_attention reproduces the model's attention "
                f"output in {len(layers)} layers (max rel. diff {capture_err:.1e}); RoPE check passed")
        for n, layer in enumerate(layers):
            log(f"\r{tag} layer {layer} ({n + 1}/{len(layers)})", end="")
            for method, frac, k, err, fb in evaluate_layer(
                states[layer], args.heldout, args.window, rotary, args.cache_only
            ):
                rows.append(dict(text=t_idx, layer=layer, method=method, fraction=frac, k=k, rel_error=err))
                if fb is not None:
                    fallback[frac].append(fb)
        log("")
        del states

    summary = summarize(rows)
    ks = {f: [r["k"] for r in rows if r["fraction"] == f] for f in FRACTIONS}
    tables = format_tables(summary, ks, fallback)
    wall = time.perf_counter() - start

    cache = args.tokens - args.heldout
    attends = "compressed cache only" if args.cache_only else (
        "compressed cache + their own (uncompressed) keys, causally")
    command = "python " + shlex.join(sys.argv)
    setup = [
        f"- command: `{command}`",
        f"- model: {model_path} ({config.num_hidden_layers} layers, {config.num_attention_heads} "
        f"query / {config.num_key_value_heads} KV heads, head dim {head_dim}, RoPE theta {theta:g}), "
        "float32, eager attention",
        f"- texts: {len(texts)} x {args.tokens} tokens from Python {platform.python_version()} "
        "pydoc_data.topics: "
        + "; ".join(f"text {i}: {', '.join(topics)}" for i, (_, topics) in enumerate(texts)),
        f"- cache C = {cache} slots (sink {SINK}, recent {RECENT}, mergeable {cache - SINK - RECENT}); "
        f"observation window W = {args.window}; held-out queries H = {args.heldout} attend to the "
        f"{attends}",
        f"- layers: {args.layers} ({len(layers)}); gamma = {DEFAULT_GAMMA:.3f}, eps = {DEFAULT_EPS:g}; "
        "RoPE-aware merging",
        f"- capture check: max relative difference to the model's attention output "
        f"{capture_err:.1e} (tolerance {CAPTURE_TOL:g})",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; wall time {wall:.1f} s",
    ]

    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "merge_fidelity.csv", rows)
    (args.out / "merge_fidelity.md").write_text(
        "# Merge fidelity: one compression round on SmolLM2 states\n\n"
        + tables + "\n\n## Setup\n\n" + "\n".join(setup) + "\n"
    )
    plotted = write_plot(
        args.out / "merge_fidelity.png", summary,
        f"{len(texts)} texts x {len(layers)} layers, C = {cache}, W = {args.window}, H = {args.heldout}",
    )

    print(tables)
    print()
    print("\n".join(setup))
    written = ["merge_fidelity.csv", "merge_fidelity.md"] + (["merge_fidelity.png"] if plotted else [])
    print(f"\nwrote {', '.join(str(args.out / name) for name in written)}")


if __name__ == "__main__":
    main()
