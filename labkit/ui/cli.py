"""The ``labkit`` command line: next, generate, compare, recipes, sweep, info, prepare, kernel, workshop.

Bad arguments exit with code 2 and a one-line message; a model that cannot be loaded exits with 1.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import sys
from collections.abc import Iterator
from typing import Any

import click

from labkit.core.errors import DeviceUnavailable, InvalidArgument, LabkitError, MissingExtra, ModelLoadError
from labkit.core.files import check_target
from labkit.records.trace import format_of

_MODEL_OPTIONS = [
    click.option("--model", default="default", show_default=True,
                 help="'default' (bundled SmolLM2-135M-Instruct), a local Hugging Face folder, a .gguf file, or a "
                 "hub id (org/name) in the local Hugging Face cache."),
    click.option("--revision", default=None, help="With a hub id: the branch, tag or commit in the local cache."),
    click.option("--device-map", "device_map", type=click.Choice(["auto", "balanced", "sequential"]), default=None,
                 help="Spread the model over GPUs, CPU and disk (accelerate); with --offload-folder for disk."),
    click.option("--offload-folder", "offload_folder", default=None, help="Folder for disk-offloaded weights."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
    click.option("--dtype", default="auto", show_default=True, help="auto, float32, bfloat16 or float16."),
    click.option("--quantization", type=click.Choice(["8bit", "4bit"]), default=None, help="bitsandbytes."),
    click.option("--attn", default="auto", show_default=True, help="auto, sdpa, eager or xformers (CUDA)."),
]


def model_options(fn: Any) -> Any:
    """Add the options every command takes (``--model``, ``--device``, ``--dtype``, ...) to a click command."""
    for option in reversed(_MODEL_OPTIONS):
        fn = option(fn)
    return fn


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """labkit errors -> one line on stderr; bad arguments exit 2, other failures exit 1."""
    try:
        yield
    except (InvalidArgument, DeviceUnavailable, ModelLoadError, MissingExtra) as e:  # wrong or unusable input
        click.echo(f"labkit: error: {e}", err=True)
        sys.exit(2)
    except LabkitError as e:
        click.echo(f"labkit: error: {e}", err=True)
        sys.exit(1)


def _session(model: str, device: str, dtype: str, quantization: str | None, attn: str, revision: str | None = None,
             device_map: str | None = None, offload_folder: str | None = None) -> Any:
    from labkit.session import Session

    return Session(model, device=device, dtype=dtype, quantization=quantization, attn=attn, revision=revision,
                   device_map=device_map, offload_folder=offload_folder)


class _OneLineErrors(click.Group):
    """click's usage errors as one line (``labkit: error: ...``, exit 2) instead of Usage / Try / Error."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as e:
            where = f"{e.ctx.command_path}: " if e.ctx is not None else ""
            click.echo(f"labkit: error: {where}{e.format_message()} (see --help)", err=True)
            sys.exit(2)
        except click.exceptions.Abort:
            click.echo("labkit: aborted", err=True)
            sys.exit(130)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="labkit")
@click.option("--plugin", "plugins", multiple=True, envvar="LABKIT_PLUGINS", metavar="MODULE",
              help="Import MODULE first (repeatable; or LABKIT_PLUGINS, comma-separated): a module that registers "
              "samplers (labkit.sampling.register), KV policies (labkit.decoding.kv.register) or attribution methods "
              "(labkit.why.attribution.register_method), which --sampler, --kv and --method then accept.")
def main(plugins: tuple[str, ...]) -> None:
    """labkit: look inside a causal language model while it generates (offline)."""
    import importlib

    for name in (n.strip() for item in plugins for n in item.split(",") if n.strip()):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise click.UsageError(f"--plugin {name!r} cannot be imported: {e}") from None


@main.command("samplers")
def samplers_cmd() -> None:
    """Every registered sampler (and beam search) with its parameters: default, allowed values, what it does."""
    from labkit.sampling import SAMPLERS, describe

    for name, cls in SAMPLERS.items():
        click.echo(f"{name}  ({cls.__module__}.{cls.__qualname__})")
        for line in describe(cls).splitlines():
            click.echo(f"    {line}")


IMAGE_OPTION = click.option("--image", "images", multiple=True, help="An image file for a vision-language model "
                            "(repeatable; one '<image>' mark per image in the prompt, or none to put them first).")


@main.command("next")
@click.argument("prompt")
@click.option("--top", "top", default=10, show_default=True, type=click.IntRange(min=1), help="How many tokens.")
@click.option("--chat", is_flag=True, help="Apply the tokenizer's chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@IMAGE_OPTION
@model_options
def next_cmd(prompt: str, top: int, chat: bool, as_json: bool, images: tuple[str, ...], **model_kw: Any) -> None:
    """Show the most probable next tokens after PROMPT (raw distribution, no sampler)."""
    with _errors():
        s = _session(**model_kw)
        d = s.next_token(prompt, chat=chat, images=list(images) or None)
        rows = d.top(top)
        if as_json:
            click.echo(json.dumps({"entropy_bits": d.entropy("bits"),
                                   "top": [{"token": t, "token_id": i, "prob": p} for t, i, p in rows]}))
            return
        click.echo(f"entropy {d.entropy('bits'):.3f} bits")
        click.echo(f"{'rank':>4}  {'token':<20} {'id':>6}  {'prob':>7}")
        for rank, (tok, tid, p) in enumerate(rows, 1):
            click.echo(f"{rank:>4}  {tok!r:<20} {tid:>6}  {p:>7.4f}")


@main.command("attribute")
@click.argument("prompt")
@click.option("--target", default=None, help="The token to explain (text of one token, or an id; default: the "
              "model's top prediction).")
@click.option("--foil", "--against", "foil", default=None,
              help="A foil token: explain target minus foil (a contrast). --against is its old name.")
@click.option("--method", default="ig", show_default=True,
              help="saliency, input_x_gradient, ig, rollout, or a method registered with "
              "labkit.why.attribution.register_method (see --plugin).")
@click.option("--quantity", type=click.Choice(["prob", "logprob", "logit"]), default="prob", show_default=True,
              help="What is attributed: the target's probability, log-probability (nats) or logit.")
@click.option("--steps", default=64, show_default=True, type=click.IntRange(min=2), help="IG's integration points.")
@click.option("--baseline", type=click.Choice(["unk", "zero", "mean"]), default="unk", show_default=True,
              help="IG's starting point: the UNK token everywhere (EOS kept; inseq's), zero embeddings or the mean "
              "token embedding.")
@click.option("--heads", default=5, show_default=True, type=click.IntRange(min=0),
              help="Also show the top heads of the direct logit attribution (0: skip it).")
@click.option("--chat", is_flag=True, help="Apply the tokenizer's chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@model_options
def attribute_cmd(prompt: str, target: str | None, foil: str | None, method: str, quantity: str, steps: int,
                  baseline: str, heads: int, chat: bool, as_json: bool, **model_kw: Any) -> None:
    """Why the model predicts TARGET after PROMPT: a score per prompt token, and the heads that write it."""
    with _errors():
        s = _session(**model_kw)
        target_arg, foil_arg = _token_arg(target), _token_arg(foil)
        a = s.attribute(prompt, target=target_arg, foil=foil_arg, method=method, quantity=quantity, steps=steps,
                        baseline=baseline, chat=chat)
        la = s.logit_attribution(prompt, token=a.target_id, foil=a.foil_id, chat=chat) if heads else None
        if as_json:
            out: dict[str, Any] = {"attribution": a.as_dict()}
            if la is not None:
                out["logit_attribution"] = {"label": la.label, "total": la.total, "logit": la.logit,
                                            "embed": la.embed, "attn": la.attn, "mlp": la.mlp, "bias": la.bias,
                                            "top_heads": [{"layer": layer, "head": h, "value": v}
                                                          for layer, h, v in la.top_heads(heads)]}
            click.echo(json.dumps(out, ensure_ascii=False))
            return
        click.echo(f"{method} attribution of {a.label} (f = {a.value:.4g})")
        if a.completeness_error is not None:
            click.echo(f"IG completeness: Σ scores = {sum(a.scores):.4g}, f(input) − f(baseline) = "
                       f"{a.value - a.baseline_value:.4g} (error {a.completeness_error:.2%}, {a.steps} steps)")
        click.echo(f"{'pos':>4}  {'token':<20} {'score':>10}")
        for pos, tok, score in zip(range(len(a.tokens)), a.tokens, a.scores, strict=True):
            click.echo(f"{pos:>4}  {tok!r:<20} {score:>+10.4f}")
        if la is not None:
            click.echo(f"direct logit attribution of {la.label} = {la.total:.4f} (logit units); top heads:")
            for layer, h, v in la.top_heads(heads):
                click.echo(f"  layer {layer:>3} head {h:>3}  {v:>+9.4f}")


def _token_arg(text: str | None) -> str | int | None:
    """A token given on the command line: an id when it is all digits, else text."""
    return int(text) if text is not None and text.isdigit() else text


def _origin(step: Any) -> str:
    """Speculative column: round and origin, with the rejected drafted token after a rejection."""
    sp = step.speculative
    rejected = f" (not {sp['rejected']['token']!r})" if "rejected" in sp else ""
    return f"r{sp['round']:<3} {sp['origin']}{rejected}"


def _print_steps(trace: Any) -> None:
    """One row per token: token, p, entropy, varentropy, the sampler's branch (Entropix), the speculative round
    and origin, and top alternatives; ``*`` marks a step whose logits a token-level intervention changed."""
    branch = any("branch" in st.sampler for st in trace.steps)
    spec = bool(trace.meta.speculative)
    click.echo(f"{'step':>4}  {'token':<16} {'p':>6}  {'H bits':>6}  {'VH bits²':>8}  "
               + (f"{'branch':<8}  " if branch else "") + (f"{'round origin':<28}  " if spec else "")
               + "top alternatives")
    for st in trace.steps:
        alts = "  ".join(f"{a.token!r} {a.prob:.2f}" for a in st.top[:3])
        b = f"{st.sampler.get('branch', ''):<8}  " if branch else ""
        o = f"{_origin(st):<28}  " if spec else ""
        mark = "*" if st.interventions else " "
        click.echo(f"{st.index:>3}{mark}  {st.token!r:<16} {st.prob:>6.3f}  {st.entropy_bits:>6.3f}  "
                   f"{st.varentropy_bits:>8.3f}  {b}{o}{alts}")
    click.echo(f"[stop: {trace.stop_reason}; {len(trace)} tokens; seed {trace.meta.seed}]")


def _knob(name: str) -> Any:
    """The option of one of Classic's declared parameters (its kind, default, allowed values and help come from the
    declaration); any of them switches sampling on. ``--temperature`` has no default: greedy when none is given."""
    from labkit.sampling import Classic

    p = Classic.params[name]
    default = None if name == "temperature" else p.default
    return click.option(f"--{name.replace('_', '-')}", default=default, show_default=default is not None, type=p.kind,
                        help=f"Sample (Classic): {p.help}; {p.allowed()}.")


@main.command("generate")
@click.argument("prompt")
@click.option("--max-new-tokens", default=40, show_default=True, type=int)
@click.option("--seed", default=None, type=int, help="Seed for sampling (recorded in the trace).")
@_knob("temperature")
@_knob("top_k")
@_knob("top_p")
@_knob("min_p")
@click.option("--sampler", "sampler_spec", default=None, help="Any registered sampler as a spec (list: labkit "
              "samplers), e.g. 'entropix' or "
              "'mirostat:tau=4' (instead of --temperature/--top-k/--top-p/--min-p).")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--suppress", multiple=True, help="Never generate this token (text of one token, or an id; repeatable).")
@click.option("--boost", multiple=True, help="TOKEN=FACTOR: multiply a token's probability (repeatable), "
              "e.g. ' science=3'.")
@click.option("--force", multiple=True, help="STEP=TOKEN: generate TOKEN at step STEP (repeatable), e.g. '0= Rome'.")
@click.option("--ablate", multiple=True, help="LAYER:HEAD: zero-ablate an attention head (repeatable).")
@click.option("--recipe", "recipes", multiple=True, help="A named intervention recipe, e.g. 'suppress-word:word=Paris'"
              " (repeatable; `labkit recipes` lists them).")
@click.option("--speculative", "speculative_spec", default=None, help="Speculative decoding with a draft: "
              "prompt-lookup[:ngram=3,max_tokens=10], layer-skip:N, bf16, fp16, 8bit, 4bit, model:PATH (settings "
              "after a comma: gamma=10, confidence=0.4, adaptive=1). Prints the round statistics.")
@click.option("--baseline", is_flag=True, help="With --speculative: also time plain decoding of the same prompt "
              "and report the measured speedup.")
@click.option("--chat", is_flag=True, help="Apply the tokenizer's chat template.")
@click.option("--kv", "kv_spec", default=None, help="KV-cache policy, e.g. 'quant:bits=4,residual=128' or "
              "'window:sinks=4,window=256' (default: the full cache); prints the cache's size at the end.")
@click.option("--show-steps", is_flag=True, help="One row per token: token, p, entropy, varentropy, top alternatives.")
@click.option("--save", "save_path", default=None, help="Save the trace (.json or .parquet).")
@IMAGE_OPTION
@model_options
def generate_cmd(prompt: str, max_new_tokens: int, seed: int | None, temperature: float | None, top_k: int,
                 top_p: float, min_p: float, sampler_spec: str | None, stop: tuple[str, ...],
                 suppress: tuple[str, ...], boost: tuple[str, ...], force: tuple[str, ...], ablate: tuple[str, ...],
                 recipes: tuple[str, ...], speculative_spec: str | None, baseline: bool, chat: bool,
                 kv_spec: str | None, show_steps: bool, save_path: str | None, images: tuple[str, ...],
                 **model_kw: Any) -> None:
    """Generate text after PROMPT and optionally show every step."""
    from labkit.sampling import Classic, parse_sampler
    from labkit.sampling.beam import strategy_arguments
    from labkit.speculative import SpeculativeStats, evaluate, parse_draft

    with _errors():
        sampling = temperature is not None or top_k or top_p != 1.0 or min_p
        if sampler_spec is not None and sampling:
            raise InvalidArgument("--sampler cannot be combined with --temperature/--top-k/--top-p/--min-p")
        sampler = Classic(temperature=1.0 if temperature is None else temperature, top_k=top_k, top_p=top_p,
                          min_p=min_p) if sampling else None
        if sampler_spec is not None:
            sampler = parse_sampler(sampler_spec)
        if save_path is not None:  # fail on a bad target before spending time on the model
            format_of(check_target(save_path, "--save"))
        if baseline and speculative_spec is None:
            raise InvalidArgument("--baseline needs --speculative")
        draft = parse_draft(speculative_spec) if speculative_spec is not None else None
        from labkit.decoding.kv import parse_kv
        from labkit.interventions.specs import from_text, parse

        policy = parse_kv(kv_spec) if kv_spec is not None else None  # a bad spec fails before the model loads

        interventions = from_text(suppress, boost, force, ablate, prefix="--")  # checked before the model loads
        s = _session(**model_kw)
        interventions += [i for spec in recipes for i in parse(s, spec)]
        kw = {"max_new_tokens": max_new_tokens, **strategy_arguments(sampler), "seed": seed,
              "stop": list(stop) or None, "chat": chat, "interventions": interventions,
              **({"kv": policy} if policy is not None else {}), **({"images": list(images)} if images else {})}
        measured = evaluate(s, prompt, draft, repeats=3, **kw) if baseline else None
        trace = measured.trace if measured else s.generate(prompt, speculative=draft, **kw)
        if show_steps:
            _print_steps(trace)
        click.echo(trace.prompt + trace.text)
        if policy is not None and trace.steps:
            click.echo(f"kv cache {policy.spec}: {trace.steps[-1].kv['bytes'] / 2**20:.3f} MiB after "
                       f"{len(trace)} tokens")
        if draft is not None:
            stats = measured.stats if measured else SpeculativeStats.of(trace)
            click.echo(f"[speculative {stats}]", err=True)
        if save_path is not None:
            click.echo(f"saved {trace.save(save_path)}", err=True)


@main.command("uncertainty")
@click.argument("prompt")
@click.option("-n", "n", default=10, show_default=True, type=click.IntRange(min=2), help="Answers to sample.")
@click.option("--max-new-tokens", default=32, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int, help="Sample b uses seed + b.")
@click.option("--sampler", "sampler_spec", default=None, help="A sampler spec (default: classic:temperature=1, "
              "the model's own distribution).")
@click.option("--stop", "stops", multiple=True, help="A stop string (repeatable), e.g. a newline: $'\\n'.")
@click.option("--chat", is_flag=True, help="Apply the tokenizer's chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@model_options
def uncertainty_cmd(prompt: str, n: int, max_new_tokens: int, seed: int, sampler_spec: str | None,
                    stops: tuple[str, ...], chat: bool, as_json: bool, **model_kw: Any) -> None:
    """How unsure the model is of its answer to PROMPT: n sampled answers, their NLL (bits), predictive and
    semantic entropy (bits)."""
    from labkit.sampling import parse_sampler

    with _errors():
        sampler = parse_sampler(sampler_spec) if sampler_spec else None
        s = _session(**model_kw)
        u = s.uncertainty(prompt, n=n, seed=seed, max_new_tokens=max_new_tokens, sampler=sampler,
                          stop=list(stops) or None, chat=chat)
        if as_json:
            click.echo(json.dumps(u.as_dict(), ensure_ascii=False))
            return
        click.echo(f"{'#':>3}  {'NLL bits':>9}  {'bits/token':>10}  {'mean H':>7}  {'cluster':>7}  answer")
        for i, smp in enumerate(u.samples):
            click.echo(f"{i:>3}  {smp.nll_bits:>9.2f}  {smp.nll_per_token_bits:>10.3f}  {smp.mean_entropy_bits:>7.3f}"
                       f"  {smp.cluster:>7}  {smp.text.strip()!r}")
        click.echo(f"predictive entropy {u.predictive_entropy_bits:.3f} bits ({u.predictive_entropy_per_token_bits:.3f}"
                   f" bits/token); semantic entropy {u.semantic_entropy_bits:.3f} bits over {len(u.clusters)} "
                   f"clusters (probability-weighted {u.semantic_entropy_weighted_bits:.3f} bits)")


@main.command("compare")
@click.argument("prompt")
@click.option("--sampler", "samplers", multiple=True, help="A sampler spec (repeatable), e.g. greedy, "
              "'classic:temperature=0.7,top_p=0.9', entropix, entropy_guided, 'mirostat:tau=4'. "
              "Default: greedy, classic:temperature=0.7,top_p=0.9 and entropix.")
@click.option("--max-new-tokens", default=40, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for every sampler's draws.")
@click.option("--chat", is_flag=True, help="Apply the tokenizer's chat template.")
@click.option("--show-steps", is_flag=True, help="Also one row per token for each sampler.")
@model_options
def compare_cmd(prompt: str, samplers: tuple[str, ...], max_new_tokens: int, seed: int, chat: bool,
                show_steps: bool, **model_kw: Any) -> None:
    """Each sampler's continuation of PROMPT with its mean entropy and surprisal (bits), and Entropix branches."""
    from labkit.sampling import label, parse_sampler, summarize
    from labkit.sampling.beam import strategy_arguments

    with _errors():
        chosen = [parse_sampler(spec) for spec in samplers or DEFAULT_COMPARE]  # all checked before loading
        s = _session(**model_kw)
        summary = []
        for sampler in chosen:
            trace = s.generate(prompt, max_new_tokens=max_new_tokens, **strategy_arguments(sampler), seed=seed,
                               chat=chat)
            f = summarize([trace])
            summary.append((label(sampler), f["mean_entropy_bits"], f["mean_surprisal_bits"], f["tokens"],
                            f["branches"]))
            click.echo(f"== {label(sampler)} ==")
            if show_steps:
                _print_steps(trace)
            click.echo(trace.prompt + trace.text + "\n")
        width = max(len(row[0]) for row in summary)
        click.echo(f"{'sampler':<{width}}  {'tokens':>6}  {'mean H bits':>11}  {'mean surprisal bits':>19}  branches")
        for name, ent, sur, n, branches in summary:
            b = " ".join(f"{k} {v}" for k, v in branches.items())
            click.echo(f"{name:<{width}}  {n:>6}  {ent:>11.3f}  {sur:>19.3f}  {b}")


DEFAULT_COMPARE = ("greedy", "classic:temperature=0.7,top_p=0.9", "entropix")


@main.command("recipes")
def recipes_cmd() -> None:
    """List the named intervention recipes (for generate --recipe)."""
    from labkit.interventions import RECIPES

    for r in RECIPES.values():
        click.echo(f"{r.name:<18} {r.description}")


@main.command("sweep")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--executor", type=click.Choice(["local", "ray"]), default=None,
              help="Where cells run (default: the config's `executor`, else local).")
@click.option("--workers", type=int, default=None, help="Ray actors (default: the config's `workers`, else 2).")
@click.option("--num-gpus", type=float, default=0.0, show_default=True, help="GPUs per Ray actor.")
@click.option("--out", default=None, help="Parquet dataset folder the rows stream into (default: the config's `out`).")
@click.option("--resume", is_flag=True, help="Keep the rows already in --out and run only the missing cells.")
@model_options
def sweep_cmd(config: str, executor: str | None, workers: int | None, num_gpus: float, out: str | None, resume: bool,
              model: str, device: str, dtype: str, quantization: str | None, attn: str, **placement: Any) -> None:
    """Run the sweep in CONFIG (YAML: prompts, samplers, interventions, seeds, max_new_tokens, metrics); print a
    summary per sampler × intervention. See examples/sweep.yaml."""
    from labkit.studies.experiments import SessionSpec, Sweep, load_config

    with _errors():
        cfg = load_config(config)
        sweep = Sweep.from_config(cfg)
        executor = executor or cfg.get("executor", "local")
        out = out or cfg.get("out")
        click.echo(f"{sweep!r} on {executor}" + (f", rows into {out}" if out else ""), err=True)
        spec = SessionSpec(model=model, device="cpu" if device == "auto" else device,
                           dtype="float32" if dtype == "auto" else dtype, threads=1 if executor == "ray" else None)
        session = _session(model, device, dtype, quantization, attn, **placement) if executor == "local" else None
        frame = sweep.run(session, executor=executor, workers=workers or cfg.get("workers", 2), num_gpus=num_gpus,
                          out=out, resume=resume, session_spec=spec)
        cols = ["mean_entropy_bits", "perplexity", "kl_to_baseline_bits", *sweep.metrics]
        click.echo(frame.groupby(["sampler", "intervention"], sort=False)[cols].mean().round(3).to_string())


@main.command("train-sae")
@click.option("--site", required=True, help="Hook site to train on, e.g. blocks.15.resid_post (labkit or "
              "TransformerLens spelling).")
@click.option("--text", "texts", multiple=True, help="A text file or a folder of .txt/.md files (repeatable); none: "
              "text sampled from the model itself.")
@click.option("--out", required=True, help="Folder to write the SAE to (SAELens' format: cfg.json, "
              "sae_weights.safetensors).")
@click.option("--architecture", type=click.Choice(["topk", "relu"]), default="topk", show_default=True)
@click.option("--d-sae", "d_sae", type=click.IntRange(min=1), default=None, help="Features (default: 4 × the width).")
@click.option("--k", type=click.IntRange(min=1), default=32, show_default=True, help="TopK: features per token.")
@click.option("--l1", type=float, default=5.0, show_default=True, help="ReLU: the L1 coefficient.")
@click.option("--steps", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--max-tokens", "max_tokens", type=click.IntRange(min=1), default=20000, show_default=True)
@click.option("--sample", type=click.IntRange(min=1), default=32, show_default=True,
              help="Without --text: how many texts to sample from the model.")
@click.option("--seed", type=int, default=0, show_default=True)
@model_options
def train_sae_cmd(site: str, texts: tuple[str, ...], out: str, architecture: str, d_sae: int | None, k: int,
                  l1: float, steps: int, max_tokens: int, sample: int, seed: int, **model_kw: Any) -> None:
    """Train a sparse autoencoder on one site of the model and save it in SAELens' format; prints its metrics
    (L0, fraction of variance explained, dead features, KL in bits and loss recovered with it spliced in)."""
    from labkit.features.sae import site_of
    from labkit.features.train import read_texts, train_sae

    with _errors():
        site = site_of(site)
        corpus = read_texts(texts) if texts else None  # a bad path fails before the model loads
        s = _session(**model_kw)
        _, report = train_sae(s, site, corpus, d_sae=d_sae, architecture=architecture, k=k, l1=l1, steps=steps,
                              max_tokens=max_tokens, sample=sample, seed=seed, save=out)
        click.echo(json.dumps(report.as_dict(), indent=1))
        click.echo(f"saved {out}", err=True)


@main.command("info")
@click.option("--verify", is_flag=True, help="Also re-check the cached default model's SHA-256 sums.")
@model_options
def info_cmd(verify: bool, **model_kw: Any) -> None:
    """Model, device, dtype, cache folder and versions."""
    import torch
    import transformers

    from labkit import __version__
    from labkit.model import models

    with _errors():
        if verify:
            folder = models.default_model_dir()
            problem = models.check_cache(folder, verify=True)
            click.echo(f"cache check: {'ok' if problem is None else problem} ({folder})")
        s = _session(**model_kw)
        i = s.info
        params = sum(p.numel() for p in s.model.parameters())
        lines = {
            "model": f"{s.model_id} ({i.path})",
            "parameters": f"{params / 1e6:.1f} M",
            "layers × heads": f"{i.n_layers} × {i.n_heads} (KV heads {i.n_kv_heads}, head_dim {i.head_dim})",
            "vocabulary": str(i.vocab_size),
            "context": f"{i.context_length} tokens",
            "device": i.device, "dtype": i.dtype, "attention": i.attn, "quantization": str(i.quantization),
            "cache folder": str(models.cache_dir()),
            "labkit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(),
            "cuda": torch.version.cuda or "none", "cuda available": str(torch.cuda.is_available()),
        }
        for k, v in lines.items():
            click.echo(f"{k:>15}: {v}")


@main.command("prepare")
@click.option("--verify", is_flag=True, help="Re-check SHA-256 sums of an existing cache.")
def prepare_cmd(verify: bool) -> None:
    """Convert the bundled default model to safetensors in the cache (once; later runs return at once)."""
    from labkit.model import models

    with _errors():
        folder = models.prepare_default_model(progress=True, verify=verify)
        size = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
        click.echo(f"default model ready: {folder} ({math.ceil(size)} MiB)")


@main.group("kernel")
def kernel_group() -> None:
    """The workshop Jupyter kernel "Python (labkit)": offline, thread-limited, labkit magics preloaded."""


@kernel_group.command("install")
@click.option("--user", is_flag=True, help="Into the user's Jupyter folder.")
@click.option("--sys-prefix", is_flag=True, help="Into this Python environment (sys.prefix).")
@click.option("--prefix", default=None, help="Into PREFIX/share/jupyter/kernels.")
@click.option("--threads", type=int, default=None, help="torch threads per kernel (default: half the CPUs).")
def kernel_install_cmd(user: bool, sys_prefix: bool, prefix: str | None, threads: int | None) -> None:
    """Install the kernelspec (default: the system-wide Jupyter folder)."""
    from labkit.teach import kernelspec

    with _errors():
        if sum([user, sys_prefix, prefix is not None]) > 1:
            raise InvalidArgument("choose at most one of --user, --sys-prefix and --prefix")
        folder = kernelspec.install(user=user, prefix=sys.prefix if sys_prefix else prefix, threads=threads)
        click.echo(f"installed kernelspec {kernelspec.KERNEL_NAME!r} (Python (labkit)) in {folder}")


@kernel_group.command("remove")
def kernel_remove_cmd() -> None:
    """Remove the installed kernelspec."""
    from labkit.teach import kernelspec

    with _errors():
        click.echo(f"removed {kernelspec.remove()}")


@main.command("student-copy")
@click.argument("source", default="notebooks")
@click.argument("target", default="student-notebooks")
@click.option("--key", default=None, help="Also write the teacher's answer key (Markdown) here, outside TARGET.")
def student_copy_cmd(source: str, target: str, key: str | None) -> None:
    """Copy the notebooks in SOURCE to TARGET for students: each solution replaced by a cell that reveals it on
    request (encoded, not readable until run), outputs cleared."""
    from labkit.teach import teaching

    with _errors():
        written = teaching.student_copy(source, target, key=key)
        click.echo(f"{len(written)} student notebooks in {target} (solutions removed: shown only on request, "
                   f"outputs cleared)" + (f"; answer key: {key}" if key else ""))


@main.command("workshop")
@click.option("--users", type=int, default=10, show_default=True, help="Students: student1..studentN.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port of the hub.")
@click.option("--ip", default="127.0.0.1", show_default=True,
              help="Where the hub listens: 127.0.0.1 (this machine only), 0.0.0.0 (every interface: the room's "
              "network reaches it; a warning says what that exposes) or one of this machine's addresses.")
@click.option("--ssl-cert", default=None, help="TLS certificate (PEM) to serve the hub over HTTPS, with --ssl-key.")
@click.option("--ssl-key", default=None, help="The TLS certificate's private key (PEM).")
@click.option("--self-signed", is_flag=True, help="Serve over HTTPS with a certificate made for the class (30 days; "
              "browsers ask once to accept it).")
@click.option("--dir", "folder", default="labkit-workshop", show_default=True,
              help="Folder for the hub's configuration, database and the students' home folders.")
@click.option("--password", default=None, help="The class's shared password (default: a random one, printed).")
@click.option("--notebooks", default=None,
              help="Teaching notebooks (default: notebooks/); students get a copy without the solution cells.")
@click.option("--no-measure", is_flag=True, help="Skip measuring the memory one student's kernel needs.")
@click.option("--shared-user", is_flag=True, help="Run every student's server as this Unix user (no isolation; the "
              "default when not run as root).")
@click.option("--user-prefix", default="labkit-", show_default=True,
              help="As root: student1 becomes the Unix user <prefix>student1 (created here, home mode 0700).")
@click.option("--memory-limit", default=None, help="Memory each student process (server, each kernel) may use, "
              "e.g. 3GiB, or 'none' (default: 90%% of RAM shared among the students, at least 1 GiB).")
@click.option("--remove-users", is_flag=True, help="Delete the students' Unix users made with --user-prefix and their "
              "home folders (collect their work first), then exit.")
def workshop_cmd(users: int, port: int, ip: str, ssl_cert: str | None, ssl_key: str | None, self_signed: bool,
                 folder: str, password: str | None, notebooks: str | None, no_measure: bool, shared_user: bool,
                 user_prefix: str, memory_limit: str | None, remove_users: bool) -> None:
    """Start a JupyterHub for a class (Ctrl-C stops it and every student's server). As root, each student is a Unix
    user who cannot read another's work or the teacher's files."""
    from labkit.teach import isolation, workshop

    with _errors():
        if remove_users:
            removed = isolation.remove_users(user_prefix)
            click.echo(f"removed {len(removed)} Unix users and their homes: {' '.join(removed) or '(none)'}")
            return
        cfg = workshop.prepare(folder, users=users, port=port, password=password, notebooks=notebooks, ip=ip,
                               ssl_cert=ssl_cert, ssl_key=ssl_key, self_signed=self_signed,
                               isolate=False if shared_user else None, prefix=user_prefix, mem_limit=memory_limit)
        if cfg.warning():
            click.echo(f"labkit workshop: warning: {cfg.warning()}", err=True)
        click.echo(f"labkit workshop: {cfg.url}  users student1..student{users}  password {cfg.password}")
        click.echo("students: " + (f"Unix users {cfg.prefix}student1..{cfg.prefix}student{users} (homes 0700)"
                                   if cfg.isolate else "all run as this Unix user (not isolated)")
                   + f"; memory limit per process: {cfg.memory_text}")
        if not no_measure:
            mem = workshop.per_student_memory()
            each = mem["steady"] + workshop.SERVER_MIB
            click.echo(f"per-student memory: {each:.0f} MiB (a kernel with the default model {mem['steady']:.0f} MiB, "
                       f"{mem['peak']:.0f} MiB while loading, + {workshop.SERVER_MIB} MiB for its JupyterLab server); "
                       f"{users} students ≈ {users * each / 1024:.1f} GiB")
            if cfg.mem_limit is not None and cfg.mem_limit < mem["peak"] * 2**20 * 1.25:
                click.echo(f"labkit workshop: warning: the memory limit ({cfg.memory_text}) leaves a kernel less than "
                           f"25% above what loading the default model takes ({mem['peak']:.0f} MiB): raise "
                           "--memory-limit or admit fewer students", err=True)
        click.echo(f"configuration: {cfg.folder / 'jupyterhub_config.py'}", err=True)
        sys.exit(workshop.serve(cfg))


if __name__ == "__main__":  # pragma: no cover
    main()
