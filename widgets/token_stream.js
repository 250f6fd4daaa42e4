// labkit TokenStream view (anywidget ESM; no CDN, no build step).
// State lives in the model's traitlets: steps + tail (the shown steps, each {id, token, p, s, h, v,
// top: [[text, id, p], ...], origin}; new steps arrive in tail, which moves into steps now and then),
// prompt, color_by ("surprisal" | "entropy" | "origin"), selected (step index or -1), branch (set on a click
// on an alternative: {step, token_id, n}). Units: surprisal s and entropy h in bits, varentropy v in bits².

// The colour scales come from Python (labkit.records.render.SCALES, the `scales` trait), so the static HTML and this view
// agree: {surprisal: {key: "s", max: 10, unit: "bits", label, rgb: [r, g, b]}, entropy: {...}}.
const SCALES = {};
const ORIGINS = {
  accepted: "#8fd18f", resampled: "#f2a09b", bonus: "#9cc3f0", target: "#dddddd",
};

function shade(value, scale) {
  const t = Math.max(0, Math.min(1, value / scale.max));
  const [r, g, b] = scale.rgb;
  const mix = (c) => Math.round(255 - (255 - c) * t);
  return `rgb(${mix(r)}, ${mix(g)}, ${mix(b)})`;
}

function background(step, by) {
  if (by === "origin") return ORIGINS[step.origin] || "transparent";
  const scale = SCALES[by] || SCALES.surprisal;
  return shade(step[scale.key] ?? 0, scale);
}

function visible(text) {
  return text.replace(/\n/g, "↵\n").replace(/\t/g, "→");
}

function legend(el, by) {
  el.replaceChildren();
  if (by === "origin") {
    for (const [name, color] of Object.entries(ORIGINS)) {
      const item = document.createElement("span");
      item.className = "lk-legend-item";
      item.style.background = color;
      item.textContent = name;
      el.append(item);
    }
    return;
  }
  const scale = SCALES[by] || SCALES.surprisal;
  const label = document.createElement("span");
  label.textContent = `${scale.label}: 0`;
  const bar = document.createElement("span");
  bar.className = "lk-legend-bar";
  bar.style.background = `linear-gradient(to right, ${shade(0, scale)}, ${shade(scale.max, scale)})`;
  const end = document.createElement("span");
  end.textContent = `≥ ${scale.max} ${scale.unit}`;
  el.append(label, bar, end);
}

function describe(details, steps, i, model) {
  details.replaceChildren();
  const step = steps[i];
  if (!step) {
    details.textContent = "Hover a token to see its alternatives; click one to branch from there.";
    return;
  }
  const head = document.createElement("div");
  head.className = "lk-details-head";
  let text = `step ${i}: ${JSON.stringify(step.token)}  p = ${step.p.toFixed(3)}  ` +
    `surprisal ${step.s.toFixed(2)} bits  H ${step.h.toFixed(2)} bits  varentropy ${step.v.toFixed(2)} bits²`;
  if (step.origin) text += `  (${step.origin})`;
  head.textContent = text;
  details.append(head);
  const list = document.createElement("div");
  list.className = "lk-alternatives";
  for (const [alt, id, p] of step.top) {
    const row = document.createElement("div");
    row.className = "lk-alt" + (id === step.id ? " lk-alt-chosen" : "");
    row.title = "click to branch: regenerate from this step with this token forced";
    const bar = document.createElement("span");
    bar.className = "lk-alt-bar";
    bar.style.width = `${Math.max(1, Math.round(p * 120))}px`;
    const name = document.createElement("span");
    name.className = "lk-alt-token";
    name.textContent = JSON.stringify(alt);
    const prob = document.createElement("span");
    prob.className = "lk-alt-p";
    prob.textContent = p.toFixed(3);
    row.append(bar, name, prob);
    row.addEventListener("click", () => {
      const previous = model.get("branch") || {};
      model.set("branch", { step: i, token_id: id, n: (previous.n || 0) + 1 });
      model.save_changes();
    });
    list.append(row);
  }
  details.append(list);
}

export default {
  render({ model, el }) {
    Object.assign(SCALES, model.get("scales"));
    el.classList.add("lk-stream");
    const legendEl = document.createElement("div");
    legendEl.className = "lk-legend";
    const body = document.createElement("div");
    body.className = "lk-tokens";
    const details = document.createElement("div");
    details.className = "lk-details";
    el.append(legendEl, body, details);
    let shown = 0; // tokens rendered
    let hovered = -1;

    const span = (step, i) => {
      const s = document.createElement("span");
      s.className = "lk-token";
      s.dataset.step = String(i);
      s.textContent = visible(step.token);
      s.style.background = background(step, model.get("color_by"));
      s.title = `p = ${step.p.toFixed(3)}`;
      s.addEventListener("mouseenter", () => {
        hovered = i;
        describe(details, all(), i, model);
        model.set("hovered", i);  // the Lab draws this token's attention on the image
        model.save_changes();
      });
      s.addEventListener("click", () => {
        model.set("selected", i);
        model.save_changes();
      });
      return s;
    };

    const all = () => model.get("steps").concat(model.get("tail"));

    const draw = () => {
      const steps = all();
      const by = model.get("color_by");
      if (steps.length < shown || body.dataset.by !== by) {
        body.replaceChildren();
        shown = 0;
        const prompt = document.createElement("span");
        prompt.className = "lk-prompt";
        prompt.textContent = model.get("prompt");
        body.append(prompt);
        body.dataset.by = by;
        legend(legendEl, by);
      }
      for (let i = shown; i < steps.length; i++) body.append(span(steps[i], i));
      shown = steps.length;
      mark();
    };

    const mark = () => {
      const selected = model.get("selected");
      for (const s of body.querySelectorAll(".lk-token")) {
        s.classList.toggle("lk-selected", Number(s.dataset.step) === selected);
      }
      const steps = all();
      const i = hovered >= 0 ? hovered : selected;
      describe(details, steps, i >= 0 && i < steps.length ? i : -1, model);
    };

    const reset = () => {
      shown = Number.MAX_SAFE_INTEGER; // forces a full redraw
      hovered = -1;
      draw();
    };

    model.on("change:steps", draw);
    model.on("change:tail", draw);
    model.on("change:color_by", reset);
    model.on("change:prompt", reset);
    model.on("change:selected", mark);
    body.addEventListener("mouseleave", () => { hovered = -1; mark(); });
    reset();
    return () => {
      model.off("change:steps", draw);
      model.off("change:tail", draw);
      model.off("change:color_by", reset);
      model.off("change:prompt", reset);
      model.off("change:selected", mark);
    };
  },
};
