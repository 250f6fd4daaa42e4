"""Lab: one panel for a whole experiment — prompt, Generate / Step / Stop, the token stream (branch by clicking an
alternative), live probability charts, the attention image, sampler sliders, interventions, and the "why" view of a
clicked token (its attribution over the context, the heads that wrote it, one click to ablate one).

Generation runs in a background thread (the kernel stays responsive); Stop ends it before the next token. UI
messages are batched (``interval_s``; the attention image at most every ``image_interval_s``)."""

from __future__ import annotations

import queue
import threading
from typing import Any

import ipywidgets as widgets
import torch

from labkit.core.errors import InvalidArgument
from labkit.interventions import ForceTokens
from labkit.interventions.specs import from_text
from labkit.records.trace import Step, Trace
from labkit.sampling import Sampler
from labkit.sampling.beam import BeamSearch, strategy_arguments
from labkit.ui.panels.attention_view import AttentionImage, grow
from labkit.ui.panels.charts import ProbabilityCharts
from labkit.ui.panels.controls import SamplerControls
from labkit.ui.panels.feature_strip import FeatureStrip
from labkit.ui.panels.stream import Throttle, TokenStream
from labkit.ui.panels.why_view import WhyView, explain


def prompt_maps(session: Any, prompt: str, chat: bool, max_new_tokens: int, images: Any = None) -> tuple[Any, str]:
    """The prompt's attention maps for the Lab's image, planned for the memory budget: the image grows to
    N = T + max_new_tokens positions and is held twice (prompt maps and the grown matrix), so float32 when
    2·L·H·N²·4 bytes fit, else float16, else none — ``(None, why)`` with the bytes and the budget, and the run goes
    on without the image."""
    from labkit.core import memory
    from labkit.core.errors import MemoryBudgetExceeded

    i = session.info
    length = session.encode(prompt, chat=chat, reserve=max_new_tokens).shape[1]  # checks the prompt first
    if images is not None:
        length = session.vision.prompt(prompt, images, chat=chat).ids.shape[1]  # with the image tokens
    size = length + max_new_tokens
    have, where = memory.available("cpu")
    for dtype, itemsize in (("float32", 4), ("float16", 2)):
        need = 2 * i.n_layers * i.n_heads * size * size * itemsize
        if need <= have:
            try:
                return session.attention(prompt, chat=chat, dtype=dtype, images=images), ""
            except MemoryBudgetExceeded:  # its own estimate is stricter: try half precision
                continue
    return None, (f"attention image off: the maps of {size} positions need {memory.fmt_bytes(need)} in float16, "
                  f"the budget is {memory.fmt_bytes(have)} ({where}); use a shorter prompt or fewer tokens "
                  "(session.attention(prompt, layers=[...]) draws chosen layers)")


def _png(image: Any) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def kv_choices() -> list[str]:
    """The KV box's suggestions: a few built-in settings, then each registered policy's default spec (any spec may be
    typed)."""
    from labkit.decoding.kv import POLICIES

    shown = ["full", "quant:bits=8,residual=0", "quant:bits=4,residual=64", "window:sinks=4,window=64",
             "h2o:budget=48,recent=16"]
    for name, cls in POLICIES.items():
        if not any(s.split(":")[0] == name for s in shown):
            try:
                shown.append(cls().spec)
            except TypeError:  # a policy without defaults: typed by the user
                shown.append(f"{name}:")
    return shown


class Lab(widgets.VBox):
    """``Lab(session)``: the live panel. Python handles: ``run(prompt)`` / ``step()`` / ``stop()`` / ``wait()`` /
    ``close()``, ``traces`` (every run and branch, newest last), ``trace`` (the one shown), ``controls.sampler``.
    ``chat`` None switches the chat template on when the tokenizer has one (an instruct model such as the default
    answers a request instead of ending at once), off otherwise. ``images`` (a vision-language model): the prompt's
    images, shown beside the stream as the model saw them, with the hovered (or clicked) token's attention on each
    cell. ``sae`` (a :class:`labkit.features.sae.SAE` or a folder): the feature strip below the why view."""

    def __init__(self, session: Any, prompt: str = "Once upon a time", sampler: Sampler | None = None,
                 max_new_tokens: int = 48, seed: int = 0, top_k: int = 10, interval_s: float = 0.2,
                 image_interval_s: float = 1.0, chat: bool | None = None, images: Any = None, sae: Any = None) -> None:
        self.session = session
        self._extras(images, sae)
        self.top_k = top_k
        n_layers, n_heads = session.info.n_layers, session.info.n_heads
        # -- inputs
        self.prompt = widgets.Textarea(value=prompt, placeholder="prompt", layout=widgets.Layout(width="98%"))
        self.prompt.add_class("labkit-prompt")
        if chat is None:
            chat = getattr(session.tokenizer, "chat_template", None) is not None
        self.chat = widgets.Checkbox(value=bool(chat), description="chat template")
        self.max_new_tokens = widgets.IntSlider(value=max_new_tokens, min=1, max=512, description="max tokens",
                                                layout=widgets.Layout(width="340px", min_width="260px"))
        self.seed = widgets.IntText(value=seed, description="seed", layout=widgets.Layout(width="160px"))
        self.kv = widgets.Combobox(value="full", options=kv_choices(), description="KV cache", ensure_option=False)
        self.kv.add_class("labkit-kv")
        self.kv_size = widgets.Label("")
        self.kv_size.add_class("labkit-kv-size")
        self.buttons = {name: widgets.Button(description=name, button_style=style)
                        for name, style in (("Generate", "primary"), ("Step", ""), ("Stop", "danger"))}
        for name, button in self.buttons.items():
            button.add_class(f"labkit-{name.lower()}")
        self.status = widgets.Label("ready")
        self.status.add_class("labkit-status")
        self.message = widgets.Label("", style={"text_color": "#b00020"})
        self.message.add_class("labkit-message")
        # -- views
        self.stream = TokenStream(interval_s=interval_s)
        self.color_by = widgets.ToggleButtons(options=["surprisal", "entropy"], description="colour by")
        self.branch = widgets.Dropdown(options=[], description="run")
        self.charts = ProbabilityCharts()
        self.attention = AttentionImage(n_layers, n_heads)
        self.controls = SamplerControls(sampler)
        self.why = WhyView(on_ablate=self._ablate_and_regenerate)
        self._extra_views()
        self._intervention_boxes(n_layers, n_heads)
        # -- state
        self.traces: list[Trace] = []
        self.trace: Trace | None = None
        self._listing = False
        self._runner: _Runner | None = None  # the open run (running, or paused by Step)
        self._halt = threading.Event()
        self._prompt_maps: Any = None  # (L, H, T, T) of the current run's prompt
        self._why_thread: threading.Thread | None = None
        self._throttle = Throttle(interval_s)
        self._image_throttle = Throttle(image_interval_s)
        self._wire()
        super().__init__(self._layout())
        self.add_class("labkit-lab")

    def _extras(self, images: Any, sae: Any) -> None:
        """The optional inputs, checked: a vision-language model's ``images``, an ``sae``."""
        from labkit.features.sae import as_sae
        from labkit.model.vlm import load_images

        if images is not None and self.session.vision is None:
            raise InvalidArgument(f"images= needs a vision-language model; {self.session.model_id!r} is a text model")
        self.images = None if images is None else load_images(images)
        self.sae = None if sae is None else as_sae(sae, self.session)

    def _extra_views(self) -> None:
        """The image beside the stream (an image run) and the feature strip (an SAE)."""
        self.features = None if self.sae is None else FeatureStrip(self.sae.name, self._feature_where,
                                                                   self._feature_edit_and_regenerate)
        self._feature_edit: Any = None  # the feature edit of the next runs (the strip's buttons)
        self.picture = widgets.Image(format="png", layout=widgets.Layout(max_width="420px"))
        self.picture.add_class("labkit-picture")
        self.picture_label = widgets.Label("")
        self._view: Any = None  # the image as the model sees it (a PIL image), for an image run
        self._drawn: dict[tuple[int, int], bytes] = {}  # (trace id, step) -> its grounding picture (PNG)

    def _intervention_boxes(self, n_layers: int, n_heads: int) -> None:
        """The interventions' inputs (applied from the next run on)."""
        self.suppress = widgets.Text(placeholder="token text, e.g. ' the'", description="suppress")
        self.boost = widgets.Text(placeholder="token text", description="boost")
        self.boost_factor = widgets.FloatSlider(value=3.0, min=0.1, max=20.0, step=0.1, description="× factor")
        self.ablate_layer = widgets.BoundedIntText(value=0, min=0, max=n_layers - 1, description="ablate layer")
        self.ablate_head = widgets.BoundedIntText(value=0, min=0, max=n_heads - 1, description="head")
        self.ablate_on = widgets.Checkbox(value=False, description="ablate this head")
        self.interventions_on = widgets.Checkbox(value=True, description="interventions on")

    def _wire(self) -> None:
        """Buttons, the token stream's clicks, the run list and the why view's method, each to its action."""
        self.buttons["Generate"].on_click(lambda _b: self._guarded(self.run))
        self.buttons["Step"].on_click(lambda _b: self._guarded(self.step))
        self.buttons["Stop"].on_click(lambda _b: self._guarded(self.stop))
        self.color_by.observe(lambda c: setattr(self.stream, "color_by", c["new"]), names="value")
        self.stream.observe(lambda c: self._guarded(self._on_select, c["new"]), names="selected")
        self.stream.observe(lambda c: self._guarded(self._show_grounding, c["new"]), names="hovered")
        self.stream.observe(lambda c: self._guarded(self._show_features, c["new"]), names="hovered")
        self.stream.observe(lambda c: self._guarded(self._on_branch, c["new"]), names="branch")
        self.branch.observe(lambda c: self._guarded(self._show_run, c["new"]), names="value")
        self.why.method.observe(lambda c: self._guarded(self._ask_why, self.stream.selected), names="value")

    def _layout(self) -> list[widgets.Widget]:
        """The panel: prompt, controls and stream beside the probability charts; the attention image beside the
        sampler and the interventions; the why view below."""
        self.charts.bars.layout.height = 260
        left = widgets.VBox([self.prompt, widgets.HBox([*self.buttons.values(), self.status]),
                             widgets.HBox([self.chat, self.max_new_tokens, self.seed]),
                             widgets.HBox([self.kv, self.kv_size]), self.message,
                             widgets.HBox([self.color_by, self.branch]), self.stream],
                            layout=widgets.Layout(width="55%"))
        shown = [self.charts.bars, self.charts.lines]
        if self.images is not None:
            shown = [widgets.VBox([self.picture_label, self.picture]), *shown]
        right = widgets.VBox(shown, layout=widgets.Layout(width="45%"))
        right.add_class("labkit-probs")
        interventions = widgets.VBox([widgets.HTML("<b>Interventions</b> (from the next run)"), self.interventions_on,
                                      self.suppress, widgets.HBox([self.boost, self.boost_factor]),
                                      widgets.HBox([self.ablate_layer, self.ablate_head, self.ablate_on])])
        lower = widgets.HBox([self.attention, widgets.VBox([widgets.HTML("<b>Sampler</b> (live)"), self.controls,
                                                            interventions])])
        return [widgets.HBox([left, right]), lower, self.why, *([self.features] if self.features else [])]

    # -- actions -------------------------------------------------------------------------------------------
    def run(self, prompt: str | None = None, extra: list[Any] | None = None) -> None:
        """Start a new run from the prompt box (or ``prompt``) in the background; ``extra`` interventions are added
        to the panel's (the branch mechanism uses ForceTokens)."""
        if prompt is not None:
            self.prompt.value = prompt
        self._start(extra or [])
        self._pull(None)

    def step(self) -> None:
        """One more token of the current run (a new run if none is open)."""
        if self._runner is None or self._runner.finished:
            self._start([])
        self._pull(1)

    def stop(self) -> None:
        """End the current run before its next token (its steps are kept)."""
        self._halt.set()
        if self.running:
            self.session.stop()
        else:
            self._close("stopped")

    def close(self) -> None:
        """End any open run (a run paused by Step holds the Session) and close the panel's widgets."""
        if not hasattr(self, "_halt"):  # its construction was refused: it holds nothing
            return
        self.stop()
        self.wait()
        self._close(None)
        self.wait_why()
        super().close()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the background work ends (for scripts and tests)."""
        if self._runner is not None:
            self._runner.idle.wait(timeout)

    @property
    def running(self) -> bool:
        """True while a generation runs in the Lab's background thread."""
        return self._runner is not None and not self._runner.idle.is_set()

    # -- internals -----------------------------------------------------------------------------------------
    def _guarded(self, fn: Any, *args: Any) -> None:
        """Run a UI callback; any error becomes the panel's message and the session stays usable."""
        try:
            self.message.value = ""
            fn(*args)
        except Exception as exc:
            self.message.value = f"{type(exc).__name__}: {exc}"

    def _interventions(self) -> list[Any]:
        if not self.interventions_on.value:
            return []
        return [*from_text(suppress=[self.suppress.value] if self.suppress.value else [],
                           boost=[f"{self.boost.value}={self.boost_factor.value}"] if self.boost.value else [],
                           ablate=[f"{self.ablate_layer.value}:{self.ablate_head.value}"] if self.ablate_on.value
                           else []),
                *([self._feature_edit] if self._feature_edit is not None else [])]

    def _start(self, extra: list[Any], label: str = "run") -> None:
        if self.running:
            raise RuntimeError("a run is in progress; press Stop first")
        self._close(None)
        prompt, chat = self.prompt.value, self.chat.value
        maps, why = prompt_maps(self.session, prompt, chat, self.max_new_tokens.value,
                                self.images)  # also checks the prompt
        gen = self.session.stream(prompt, max_new_tokens=self.max_new_tokens.value,
                                  **strategy_arguments(self.controls.sampler), seed=self.seed.value, chat=chat,
                                  top_k=self.top_k,
                                  capture=[] if isinstance(self.controls.sampler, BeamSearch) else
                                  ["attention", *([self.sae] if self.sae is not None else [])],
                                  interventions=[*self._interventions(), *extra], kv=self.kv.value or None,
                                  images=self.images)
        self._runner, self.trace = _Runner(gen, self), gen.trace
        self._prompt_maps = maps
        self.traces.append(gen.trace)
        self._listing = True  # the run list changes here: not a user's choice
        try:
            self.branch.options = [*self.branch.options, (f"{len(self.traces)}: {label}", len(self.traces) - 1)]
            self.branch.value = len(self.traces) - 1
        finally:
            self._listing = False
        self.stream.clear(prompt)
        if self.images is not None:
            self._view = self.session.vision.view(self.session.vision.prompt(prompt, self.images, chat=chat))
            self.picture.value = _png(self._view)
            self.picture_label.value = "the image as the model sees it: hover a token for its attention on it"
        self.charts.show_step(None)
        self.charts.show_series([])
        if maps is not None:
            self.attention.set_maps(maps.probs, maps.tokens, prompt=True)
        else:
            self.attention.label.value = why

    def _pull(self, n: int | None) -> None:
        if self.running:
            raise RuntimeError("a run is in progress; press Stop first")
        self._halt.clear()
        self.status.value = "running"
        self._runner.pull(n)

    def _close(self, reason: str | None) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        if reason is not None and self.trace is not None:
            self.status.value = f"{reason} after {len(self.trace)} tokens"

    def _on_step(self, step: Step) -> None:
        self.stream.push(step)
        if self._throttle.due():
            self._refresh()

    def _refresh(self, force: bool = False) -> None:
        trace = self.trace
        if trace is None:
            return
        self.stream.flush()
        steps = list(trace.steps)
        if self.stream.selected < 0:
            self.charts.show_step(steps[-1] if steps else None)
        self.charts.show_series(steps)
        if steps and steps[-1].kv:
            self.kv_size.value = (f"cache {steps[-1].kv['bytes'] / 2**20:.2f} MiB after {len(steps)} tokens "
                                  f"({steps[-1].kv['policy']})")
        if (force or self._image_throttle.due()) and self._prompt_maps is not None:
            rows = [s.captures["attention"] for s in steps if "attention" in s.captures]
            tokens = self._prompt_maps.tokens + [s.token for s in steps[:-1]]
            self.attention.set_maps(grow(self._prompt_maps.probs, rows), tokens)

    def _on_select(self, index: int) -> None:
        if self.trace is not None and 0 <= index < len(self.trace):
            self.charts.show_step(self.trace.steps[index], index)
            self._show_grounding(index)
            self._show_features(index)
            self._ask_why(index)

    def _show_features(self, index: int) -> None:
        """The feature strip's top features of step ``index`` (a Lab given an SAE)."""
        if self.features is not None and self.trace is not None and 0 <= index < len(self.trace):
            self.features.show_step(index, self.trace.steps[index])

    def _feature_where(self, feature: int) -> None:
        """Where ``feature`` fires over the shown run's prompt and tokens (one forward pass, when no run holds the
        Session)."""
        from labkit.features import reading

        if self.trace is None or self.running:
            self.features.status.value = "where a feature fires is shown when no run is going: press Stop"
            return
        if self.images is not None:
            self.features.status.value = "where a feature fires is not shown for an image run (read s.features)"
            return
        ids = torch.tensor([[*self.trace.prompt_ids, *self.trace.token_ids]], device=self.session.device)
        tokens = [self.session.token_text(i) for i in ids[0].tolist()]
        with self.session.exclusive():
            found = reading.features(self.session.sites, ids, self.sae, tokens)
        self.features.show_where(feature, tokens, found.where(feature))

    def _feature_edit_and_regenerate(self, kind: str, feature: int, scale: float) -> None:
        """The strip's buttons: regenerate the prompt with ``feature`` steered by ``scale`` or ablated (kept for the
        runs after, until another feature edit)."""
        from labkit.interventions.features import AblateFeature, SteerFeature

        self._feature_edit = (SteerFeature(self.sae, feature, scale) if kind == "steer"
                              else AblateFeature(self.sae, feature))
        if self.running:
            self.stop()
            self.wait()
        self._guarded(self.run)
        self.features.status.value = (f"regenerating with {self._feature_edit!r}: run {len(self.traces)} in the run "
                                      "list")

    def _show_grounding(self, index: int) -> None:
        """The image with step ``index``'s attention on each cell (mean over layers and heads), for an image run."""
        from labkit.why.vision import grounding

        if self.images is None or self.trace is None or not self.trace.images or not 0 <= index < len(self.trace) \
                or "attention" not in self.trace.steps[index].captures:
            return
        key = (id(self.trace), index)
        if key not in self._drawn:  # each token's picture drawn once (hovering goes back and forth)
            self._drawn = {k: v for k, v in self._drawn.items() if k[0] == key[0]}
            self._drawn[key] = grounding(self.trace).plot(index, self._view).png()
        self.picture.value = self._drawn[key]
        self.picture_label.value = f"step {index} {self.trace.steps[index].token!r}: attention on the image"

    # -- why -------------------------------------------------------------------------------------------------
    def _ask_why(self, index: int) -> None:
        """Compute the why view of step ``index`` in the background: in the open run's thread between two steps
        (it holds the Session; the stream goes on after), else in a thread of its own."""
        if self.trace is None or not 0 <= index < len(self.trace):
            return
        request = (self.trace, index, self.why.method.value)
        self.why.waiting(index, self.trace.steps[index].token)
        if self._runner is not None and not self._runner.finished:
            self._runner.ask(request)
        else:
            self._why_thread = threading.Thread(target=self._explain, args=(*request, True), daemon=True,
                                                name="labkit-why")
            self._why_thread.start()

    def _explain(self, trace: Trace, index: int, method: str, locked: bool) -> None:
        try:
            attribution, logit_attribution = explain(self.session, trace, index, method, locked=locked)
        except Exception as exc:
            self.why.failed(exc)
            return
        self.why.show(index, attribution, logit_attribution)

    def wait_why(self, timeout: float | None = None) -> None:
        """Block until the why view asked for last is drawn (for scripts and tests)."""
        thread = self._why_thread
        if thread is not None:
            thread.join(timeout)
        if self._runner is not None:
            self._runner.why_idle.wait(timeout)

    def _ablate_and_regenerate(self, layer: int, head: int) -> None:
        """A top head's button: put it in the ablation box and regenerate the prompt with it ablated."""
        self.ablate_layer.value, self.ablate_head.value, self.ablate_on.value = layer, head, True
        self.interventions_on.value = True
        if self.running:
            self.stop()
            self.wait()
        self._guarded(self.run)
        self.why.status.value = (f"regenerating with head {layer}:{head} ablated: run {len(self.traces)} in the run "
                                 f"list; run {len(self.traces) - 1} is the one explained")

    def _on_branch(self, request: dict[str, Any]) -> None:
        """Regenerate from ``request["step"]`` with ``request["token_id"]`` forced there (the earlier tokens are
        forced to the shown run's), keeping the old run in ``traces``."""
        if not request or self.trace is None:
            return
        k, token = int(request["step"]), int(request["token_id"])
        forced = {**dict(enumerate(self.trace.token_ids[:k])), k: token}
        if self.running:
            self.stop()
            self.wait()
        self._start_branch(forced)

    def _start_branch(self, forced: dict[int, int]) -> None:
        k = max(forced)
        force = ForceTokens(forced)
        self.prompt.value = self.trace.prompt if self.trace is not None else self.prompt.value
        self._start([force], label=f"branch at step {k} → {self.session.token_text(forced[k])!r}")
        self._pull(None)

    def _show_run(self, index: int | None) -> None:
        if self._listing or index is None or self.running or not 0 <= index < len(self.traces):
            return
        if self.traces[index] is self.trace:
            return
        self._close(None)
        self.trace = self.traces[index]
        self.stream.show(self.trace)
        self._prompt_maps = None
        self.charts.show_step(self.trace.steps[-1] if self.trace.steps else None)
        self.charts.show_series(self.trace.steps)
        self.status.value = f"showing run {index + 1} ({len(self.trace)} tokens)"


class _Runner:
    """One run's Generation and the one thread that iterates it: torch's inference mode and the Session's lock
    belong to the thread that entered them, so every Step of a run (Generate, then Step, Step...) is made there."""

    _CLOSE = object()
    _POKE = object()  # wakes an idle runner to serve a why request

    def __init__(self, gen: Any, lab: Lab) -> None:
        self.gen, self.lab = gen, lab
        self.finished = False
        self.idle = threading.Event()
        self.idle.set()
        self._orders: queue.Queue[Any] = queue.Queue()
        self._why: queue.Queue[Any] = queue.Queue()
        self.why_idle = threading.Event()
        self.why_idle.set()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="labkit-lab")
        self._thread.start()

    def pull(self, n: int | None) -> None:
        """Make ``n`` more steps (None: to the end) in the background."""
        self.idle.clear()
        self._orders.put(n)

    def ask(self, request: tuple[Any, ...]) -> None:
        """Compute a why view (trace, index, method) in this run's thread: between two steps, or now if idle."""
        self.why_idle.clear()
        self._why.put(request)
        self._orders.put(self._POKE)

    def _serve_why(self) -> None:
        while not self._why.empty():
            self.lab._explain(*self._why.get(), False)  # this thread holds the Session: no lock to take
        self.why_idle.set()

    def close(self) -> None:
        """End the generation (keeps its steps; releases the Session) and the thread."""
        self._orders.put(self._CLOSE)
        self._thread.join()

    def _loop(self) -> None:
        lab = self.lab
        while (n := self._orders.get()) is not self._CLOSE:
            if n is self._POKE:
                self._serve_why()
                continue
            try:
                finished = True
                for done, step in enumerate(self.gen, start=1):
                    lab._on_step(step)
                    self._serve_why()
                    if lab._halt.is_set() or (n is not None and done >= n):
                        finished = lab._halt.is_set()
                        break
                if finished:
                    self.gen.close()
                    self.finished = True
                    lab.status.value = f"{self.gen.trace.stop_reason or 'stopped'} after {len(self.gen.trace)} tokens"
                else:
                    lab.status.value = f"paused after {len(self.gen.trace)} tokens (Step for more)"
            except Exception as exc:
                self.gen.close()
                self.finished = True
                lab.message.value = f"{type(exc).__name__}: {exc}"
                lab.status.value = f"error after {len(self.gen.trace)} tokens"
            finally:
                lab._refresh(force=True)
                self.idle.set()
        self.gen.close()
