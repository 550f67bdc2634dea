"""The labeling UI (Gradio): `mount_labeling_ui(app)` mounts it on the FastAPI app at /label,
with the admin view (app/admin.py) at /admin; `create_app(ui=mount_labeling_ui)` calls it.

Authentication happens in FastAPI (the /login session cookie); every handler here re-checks the
user from the request and acts only through `app.annotation`, the same functions as the REST
API, so the UI cannot do anything the API would refuse. Model text is shown only as sanitised HTML
from `labeling.render`.

Keys: pairwise 1-4 pick A / B / tie / both bad; binary 1 / 2 pick up / down; Enter submits
(Ctrl+Enter inside the rationale box); S skips; U undoes the last label.

    prefloop up   # then open http://127.0.0.1:8000/label/
"""

from __future__ import annotations

import html
import uuid
from typing import Any

import gradio as gr
from fastapi import FastAPI, Request

from app import annotation
from app.auth import user_from_request
from app.ratelimit import TokenBucket
from app.schemas import LabelIn, TaskView
from app.settings import Settings
from app.web_security import script_hash
from labeling.render import CODE_CSS, render_content
from store.db import Database
from store.errors import StoreError
from store.models import TaskKind

MAX_K = 16
KINDS = ["pairwise", "listwise", "binary"]
PAIRWISE_BUTTONS = [("a", "A is better  (1)"), ("b", "B is better  (2)"), ("tie", "Tie  (3)"),
                    ("both_bad", "Both bad  (4)")]
CHOICE_NAMES = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both bad",
                "up": "Thumbs up", "down": "Thumbs down"}

UI_CSS = CODE_CSS + """
.prefloop-md { font-size: 15px; line-height: 1.5; }
.prefloop-md pre { background: #f5f5f5; padding: .6em; overflow-x: auto; border-radius: 4px; }
.prefloop-msg { border-left: 3px solid #ccc; padding: .2em .8em; margin: .4em 0; }
.prefloop-user { border-color: #3b82f6; }
.prefloop-assistant { border-color: #10b981; }
.prefloop-system { border-color: #a855f7; }
.prefloop-role { font-size: 12px; text-transform: uppercase; color: #666; }
.prefloop-title { font-weight: 600; margin-bottom: .3em; }
.prefloop-response { border: 1px solid #ddd; border-radius: 6px; padding: .5em .8em; }
"""

# Keyboard shortcuts. Buttons are clicked by id, so a key does exactly what the click does.
KEYS_SCRIPT = """
(() => {
  if (window.__prefloopKeys) return;
  window.__prefloopKeys = true;
  const visible = (id) => {
    const el = document.getElementById(id);
    return el && el.offsetParent !== null ? el : null;
  };
  const press = (ids) => {
    for (const id of ids) { const el = visible(id); if (el) { el.click(); return true; } }
    return false;
  };
  const keys = {
    "1": ["choice-a", "thumb-up"], "2": ["choice-b", "thumb-down"],
    "3": ["choice-tie"], "4": ["choice-both_bad"], "s": ["skip"], "u": ["undo"],
  };
  document.addEventListener("keydown", (e) => {
    const t = e.target;
    const typing = t && (t.tagName === "TEXTAREA" || t.isContentEditable ||
      (t.tagName === "INPUT" && !["radio", "checkbox", "button"].includes(t.type)));
    if (e.key === "Enter" && (!typing || e.ctrlKey || e.metaKey)) {
      if (press(["submit"])) e.preventDefault();
      return;
    }
    if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
    const ids = keys[e.key.toLowerCase()];
    if (ids && press(ids)) e.preventDefault();
  });
})();
"""
HEAD = f"<script>{KEYS_SCRIPT}</script>"


def _fresh_state(kind: str) -> dict[str, Any]:
    return {"task_id": None, "kind": kind, "k": 0, "choice": None, "key": None}


class LabelingUI:
    """The Blocks and their handlers; one instance per app (it holds no per-user state)."""

    def __init__(self, db: Database, settings: Settings, submit_limiter: TokenBucket):
        self.db, self.settings, self.submit_limiter = db, settings, submit_limiter

    # -- helpers --------------------------------------------------------------------------

    def _user(self, request: gr.Request | None) -> annotation.User | None:
        connection = getattr(request, "request", None) if request is not None else None
        if connection is None:
            return None
        return user_from_request(connection, self.db)

    def _header(self, user: annotation.User, kind: str) -> str:
        done, left = annotation.progress(self.db, user, TaskKind(kind))
        return (f"Signed in as **{html.escape(user.name)}** ({user.role.value}) · "
                f"**{done}** labelled · **{left}** {kind} tasks left for you")

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="prefloop · labeling") as demo:
            with gr.Row():
                self.header = gr.Markdown(elem_id="header")
                gr.HTML('<form method="post" action="/logout"><button id="logout" '
                        'type="submit">Log out</button></form>', js_on_load=None)
            self.kind = gr.Radio(KINDS, value="pairwise", label="Queue", elem_id="queue-kind")
            with gr.Accordion("Guidelines", open=False, elem_id="guidelines"):
                gr.Markdown(self.settings.guidelines)
            self.status = gr.Markdown(elem_id="status")
            self.prompt = gr.HTML(elem_id="prompt", js_on_load=None)
            with gr.Column(visible=False) as self.pairwise_box:
                with gr.Row(equal_height=False):
                    self.resp_a = gr.HTML(elem_id="resp-a", js_on_load=None)
                    self.resp_b = gr.HTML(elem_id="resp-b", js_on_load=None)
                with gr.Row():
                    self.choice_buttons = {c: gr.Button(text, elem_id=f"choice-{c}")
                                           for c, text in PAIRWISE_BUTTONS}
            with gr.Column(visible=False) as self.listwise_box:
                gr.Markdown("Give every response a rank (1 = best). Equal ranks are ties.")
                self.slots, self.slot_html, self.slot_rank = [], [], []
                for i in range(MAX_K):
                    with gr.Row(visible=False) as slot:
                        self.slot_html.append(gr.HTML(elem_id=f"list-resp-{i}",
                                                      js_on_load=None))
                        self.slot_rank.append(gr.Radio([], label=f"Rank of response {i + 1}",
                                                       elem_id=f"rank-{i}", scale=0,
                                                       min_width=220))
                    self.slots.append(slot)
            with gr.Column(visible=False) as self.binary_box:
                self.single = gr.HTML(elem_id="resp-single", js_on_load=None)
                with gr.Row():
                    self.up = gr.Button("👍 Thumbs up  (1)", elem_id="thumb-up")
                    self.down = gr.Button("👎 Thumbs down  (2)", elem_id="thumb-down")
            self.selection = gr.Markdown(elem_id="selection")
            self.rationale = gr.Textbox(label="Rationale (optional)", lines=2,
                                        elem_id="rationale", max_length=10_000)
            with gr.Row():
                self.submit = gr.Button("Submit  (Enter)", variant="primary", elem_id="submit")
                self.skip = gr.Button("Skip  (S)", elem_id="skip")
                self.undo = gr.Button("Undo last label  (U)", elem_id="undo")
            self.state = gr.State(_fresh_state("pairwise"))
            self._wire(demo)
        # Handlers are thread-safe and mostly wait on the store: do not serialise all users'
        # events behind Gradio's default of one at a time per event.
        demo.queue(default_concurrency_limit=self.settings.ui_concurrency)
        return demo

    def _outputs(self) -> list[Any]:
        return [self.header, self.status, self.prompt, self.pairwise_box, self.resp_a,
                self.resp_b, self.listwise_box, *self.slots, *self.slot_html, *self.slot_rank,
                self.binary_box, self.single, self.selection, self.rationale, self.state,
                self.kind]

    def _wire(self, demo: gr.Blocks) -> None:
        outputs = self._outputs()
        demo.load(self.load, inputs=[self.kind, self.state], outputs=outputs)
        self.kind.input(self.load, inputs=[self.kind, self.state], outputs=outputs)
        for choice, button in self.choice_buttons.items():
            button.click(self._chooser(choice), inputs=[self.state],
                         outputs=[self.state, self.selection, self.status])
        self.up.click(self._chooser("up"), inputs=[self.state],
                      outputs=[self.state, self.selection, self.status])
        self.down.click(self._chooser("down"), inputs=[self.state],
                        outputs=[self.state, self.selection, self.status])
        self.submit.click(self.submit_label, inputs={self.state, self.rationale,
                                                     *self.slot_rank}, outputs=outputs)
        self.skip.click(self.skip_task, inputs=[self.state], outputs=outputs)
        self.undo.click(self.undo_last, inputs=[self.state], outputs=outputs)

    # -- views ----------------------------------------------------------------------------

    def _view(self, user: annotation.User | None, kind: str, task: TaskView | None,
              status: str) -> dict[Any, Any]:
        """Every output for showing `task` (or the empty-queue / logged-out message)."""
        state = _fresh_state(kind)
        out: dict[Any, Any] = {
            self.status: status, self.selection: "", self.rationale: "", self.kind: kind,
            self.pairwise_box: gr.Column(visible=False),
            self.listwise_box: gr.Column(visible=False),
            self.binary_box: gr.Column(visible=False), self.prompt: "",
            self.resp_a: "", self.resp_b: "", self.single: "",
        }
        for i in range(MAX_K):
            out[self.slots[i]] = gr.Row(visible=False)
            out[self.slot_html[i]] = ""
            out[self.slot_rank[i]] = gr.Radio(choices=[], value=None)
        out[self.header] = self._header(user, kind) if user else "Not signed in."
        if task is not None:
            state.update(task_id=task.task_id, k=len(task.completions),
                         key=f"ui-{uuid.uuid4().hex}")
            out[self.prompt] = render_content(task.prompt, label="Prompt")
            texts = [c.content for c in task.completions]
            if task.kind == "pairwise":
                out[self.pairwise_box] = gr.Column(visible=True)
                out[self.resp_a] = render_content(texts[0], label="Response A")
                out[self.resp_b] = render_content(texts[1], label="Response B")
            elif task.kind == "binary":
                out[self.binary_box] = gr.Column(visible=True)
                out[self.single] = render_content(texts[0], label="Response")
            else:
                out[self.listwise_box] = gr.Column(visible=True)
                ranks = [str(r) for r in range(1, len(texts) + 1)]
                for i, text in enumerate(texts):
                    out[self.slots[i]] = gr.Row(visible=True)
                    out[self.slot_html[i]] = render_content(text, label=f"Response {i + 1}")
                    out[self.slot_rank[i]] = gr.Radio(choices=ranks, value=None)
        out[self.state] = state
        return out

    def _show_next(self, user: annotation.User, kind: str, status: str) -> dict[Any, Any]:
        task = annotation.next_task(self.db, self.settings, user, TaskKind(kind))
        if task is None:
            status = (f"{status} " if status else "") + (
                f"**Your {kind} queue is empty.** Nothing is waiting for you right now; "
                "try another queue or come back later.")
        return self._view(user, kind, task, status)

    def _signed_out(self, kind: str) -> dict[Any, Any]:
        return self._view(None, kind, None, "**Your session has ended.** "
                          "[Log in again](/login?next=/label/).")

    # -- handlers (each re-checks the user) -------------------------------------------------

    def load(self, kind: str, state: dict[str, Any], request: gr.Request) -> dict[Any, Any]:
        user = self._user(request)
        kind = kind if kind in KINDS else "pairwise"
        if user is None:
            return self._signed_out(kind)
        return self._show_next(user, kind, "")

    def _chooser(self, choice: str) -> Any:
        def choose(state: dict[str, Any], request: gr.Request) -> tuple[Any, str, str]:
            if self._user(request) is None:
                return state, "", "**Your session has ended.** [Log in again](/login)."
            if state.get("task_id") is None:
                return state, "", "There is no task to answer."
            return ({**state, "choice": choice},
                    f"Your answer: **{CHOICE_NAMES[choice]}** — press Enter to submit.", "")
        return choose

    def submit_label(self, data: dict[Any, Any], request: gr.Request) -> dict[Any, Any]:
        state = data[self.state]
        kind = state.get("kind", "pairwise")
        user = self._user(request)
        if user is None:
            return self._signed_out(kind)
        if state.get("task_id") is None:
            return {self.status: "There is no task to submit."}
        if kind == "listwise":
            picked = [data[self.slot_rank[i]] for i in range(state["k"])]
            if any(p in (None, "") for p in picked):
                return {self.status: "Give every response a rank before submitting."}
            ranks = [int(p) for p in picked]
            groups = [[i for i, r in enumerate(ranks) if r == rank]
                      for rank in sorted(set(ranks))]
            body = LabelIn(ranking=[g[0] if len(g) == 1 else g for g in groups])
        elif state.get("choice") is None:
            return {self.status: "Pick an answer first (keys 1-4, or the buttons)."}
        elif kind == "pairwise":
            body = LabelIn(choice=state["choice"])
        else:
            body = LabelIn(value=state["choice"])
        body.rationale = (data[self.rationale] or "").strip() or None
        allowed, wait = self.submit_limiter.allow(str(user.id))
        if not allowed:
            return {self.status: f"Too many submits; wait {max(1, round(wait))} s and retry."}
        try:
            out = annotation.submit_label(self.db, user, state["task_id"], body,
                                          idempotency_key=state["key"])
        except StoreError as exc:
            return self._show_next(user, kind, f"Not saved: {html.escape(str(exc))}.")
        return self._show_next(user, kind, f"Saved label #{out.label_id}. You can undo it "
                               f"for {self.settings.undo_grace_s:g} s (U).")

    def skip_task(self, state: dict[str, Any], request: gr.Request) -> dict[Any, Any]:
        kind = state.get("kind", "pairwise")
        user = self._user(request)
        if user is None:
            return self._signed_out(kind)
        if state.get("task_id") is not None:
            try:
                annotation.skip_task(self.db, user, state["task_id"])
            except StoreError as exc:
                return self._show_next(user, kind, f"Could not skip: {html.escape(str(exc))}.")
        return self._show_next(user, kind, "Skipped.")

    def undo_last(self, state: dict[str, Any], request: gr.Request) -> dict[Any, Any]:
        kind = state.get("kind", "pairwise")
        user = self._user(request)
        if user is None:
            return self._signed_out(kind)
        last = annotation.last_label(self.db, user)
        if last is None:
            return {self.status: "You have no label to undo."}
        try:
            annotation.undo_label(self.db, self.settings, user, last.label_id)
        except StoreError as exc:
            return {self.status: f"Cannot undo: {html.escape(str(exc))}."}
        # The task is leased to the user again, so it comes back first in its queue.
        return self._show_next(user, last.kind, f"Undid label #{last.label_id}; the task is "
                               "back for you to answer again.")


def build_ui(db: Database, settings: Settings, submit_limiter: TokenBucket) -> gr.Blocks:
    """The labeling Blocks; `submit_limiter` is shared with the REST API's submit route."""
    return LabelingUI(db, settings, submit_limiter).build()


def mount_labeling_ui(app: FastAPI) -> None:
    """Mount the labeling UI at /label and the admin view at /admin on `app` (built by
    app.main.create_app, whose AreaGate has already checked the user of every request there).
    The UI shares the app's store, settings and submit limiter (`app.state`)."""
    from app.admin import build_admin

    state = app.state
    # The keyboard script is an inline script the Gradio frontend inserts itself: the page's
    # Content-Security-Policy allows exactly this text (app/web_security.py).
    hashes = getattr(state, "csp_script_hashes", None)
    if hashes is not None:
        hashes.append(script_hash(KEYS_SCRIPT))

    def username(request: Request) -> str | None:
        user = getattr(request.state, "user", None)
        return user.name if user is not None else None

    gr.mount_gradio_app(app, build_ui(state.db, state.settings, state.submit_limiter),
                        path="/label", auth_dependency=username, css=UI_CSS, head=HEAD,
                        footer_links=[], ssr_mode=False)
    gr.mount_gradio_app(app, build_admin(state.db), path="/admin", auth_dependency=username,
                        footer_links=[], ssr_mode=False)

