"""The review web app: annotators verify queued pairs one at a time; leads watch throughput and agreement.

    synpref review add-annotator alice            # prints alice's token once (stored hashed)
    synpref review serve --port 8000

Security: every page and API needs a valid token (401 otherwise); tokens are stored as SHA-256 hashes; an
annotator sees other verdicts on a pair only after submitting their own (blind review); the author of a verdict is
always the token's owner; nothing is ever changed or deleted: the ledger is append-only, so an annotator who
revises a verdict adds a new row (the response says `revised`), the earlier one stays as history and the
resolution counts each annotator's latest; every text is HTML-escaped by the template engine (autoescape), so a
response containing markup renders as text.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from fastapi import FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from jinja2 import DictLoader, Environment, select_autoescape
from pydantic import BaseModel

from pipelines.lake import Lake
from pipelines.review.ledger import VerdictIn, agreement_by_annotator, append_verdicts, read_verdicts
from pipelines.review.queue import QUEUE
from pipelines.tables import ANNOTATIONS, PRECHECKS, RAW

COOKIE = "synpref_token"


# --- annotators --------------------------------------------------------------------------------------------------
def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_annotator(path: Path, name: str, role: str = "annotator") -> str:
    """Create (or rotate) an annotator's token; only its hash is stored. Returns the token."""
    if role not in ("annotator", "lead"):
        raise ValueError("role must be annotator or lead")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    token = secrets.token_urlsafe(24)
    data[name] = {"token_sha256": _hash(token), "role": role}
    path.write_text(json.dumps(data, indent=1))
    path.chmod(0o600)
    return token


@dataclass
class User:
    name: str
    role: str


def _authenticate(path: Path, token: str | None) -> User | None:
    if not token or not path.exists():
        return None
    h = _hash(token)
    for name, rec in json.loads(path.read_text()).items():
        if hmac.compare_digest(rec["token_sha256"], h):
            return User(name, rec["role"])
    return None


# --- templates ---------------------------------------------------------------------------------------------------
BASE = """<!doctype html><html><head><meta charset="utf-8"><title>SynPref review</title>
<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#222}
pre{white-space:pre-wrap;background:#f6f6f6;padding:.6em;border-radius:6px}
.cands{display:flex;gap:1em}.cand{flex:1;border:1px solid #ccc;border-radius:8px;padding:.6em}
.meta{font-size:.9em;color:#555}button{font-size:1em;padding:.4em 1em;margin-right:.5em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em}</style></head><body>
<div class="meta">{% if user %}Signed in as <b>{{ user.name }}</b> ({{ user.role }}){% if user.role == 'lead' %}
 · <a href="/lead">lead view</a>{% endif %} · <a href="/">next pair</a>{% endif %}</div>
{% block body %}{% endblock %}</body></html>"""

LOGIN = """{% extends "base.html" %}{% block body %}<h2>Sign in</h2>
{% if error %}<p style="color:#b00">{{ error }}</p>{% endif %}
<form method="post" action="/login"><input name="token" type="password" placeholder="personal token" size="40"
autofocus> <button type="submit">Sign in</button></form>{% endblock %}"""

ITEM = """{% extends "base.html" %}{% block body %}
<p class="meta">Progress: {{ done }} verdicts by you · {{ remaining }} pairs left in queue {{ queue_version }}</p>
{% if not item %}<h2>Nothing left to review. Thank you!</h2>{% else %}
<h3>Task: {{ item.task_category }} · {{ item.objectivity }} · controversiality {{ item.controversiality }}</h3>
<p><b>Why queued:</b> {{ item.why }}</p>
<p><b>Desired attributes:</b> {{ item.desired }}</p><p><b>Guideline:</b> {{ item.guideline }}</p>
<h4>Conversation</h4>{% for m in item.history %}<pre><b>{{ m.role }}:</b> {{ m.content }}</pre>{% endfor %}
<div class="cands"><div class="cand" id="cand1"><h4>Candidate 1</h4><pre>{{ item.c1 }}</pre>
{% if item.check1 %}<p class="meta">LLM pre-check: {{ item.check1 }}</p>{% endif %}</div>
<div class="cand" id="cand2"><h4>Candidate 2</h4><pre>{{ item.c2 }}</pre>
{% if item.check2 %}<p class="meta">LLM pre-check: {{ item.check2 }}</p>{% endif %}</div></div>
<form method="post" action="/verdict" id="vform">
<input type="hidden" name="pair_id" value="{{ item.pair_id }}"><input type="hidden" name="order_shown"
value="{{ item.order }}"><input type="hidden" name="started" value="{{ started }}">
<input type="hidden" name="choice" id="choice" value="">
<p><label>Note <input name="note" size="60"></label></p>
<p><label>Task category (edit if wrong) <input name="task_category" value="{{ item.task_category }}"></label>
<label>Guideline (edit if wrong) <input name="guideline" size="50" value="{{ item.guideline }}"></label></p>
<button type="button" onclick="pick('1')">Candidate 1 better [1]</button>
<button type="button" onclick="pick('2')">Candidate 2 better [2]</button>
<button type="button" onclick="pick('undecidable')">Cannot decide — discard [0]</button></form>
<script>function pick(c){document.getElementById('choice').value=c;document.getElementById('vform').submit();}
document.addEventListener('keydown',function(e){if(e.target.tagName==='INPUT')return;
if(e.key==='1')pick('1');else if(e.key==='2')pick('2');else if(e.key==='0'||e.key==='u')pick('undecidable');});
</script>{% endif %}{% endblock %}"""

LEAD = """{% extends "base.html" %}{% block body %}<h2>Lead view</h2>
<p>{{ total }} verdicts on {{ pairs }} pairs · discard rate {{ '%.1f'|format(discard_rate * 100) }}%</p>
<h3>Throughput</h3><table><tr><th>annotator</th><th>verdicts</th><th>median seconds</th><th>discards</th></tr>
{% for r in throughput %}<tr><td>{{ r.annotator }}</td><td>{{ r.n }}</td><td>{{ '%.1f'|format(r.median_s or 0) }}</td>
<td>{{ r.discards }}</td></tr>{% endfor %}</table>
<h3>Agreement on overlap items</h3><table><tr><th>annotator</th><th>overlap items</th><th>agreement</th></tr>
{% for r in agreement %}<tr><td>{{ r.annotator }}</td><td>{{ r.overlap_items }}</td>
<td>{{ '%.2f'|format(r.agreement) }}</td></tr>{% endfor %}</table>{% endblock %}"""

ENV = Environment(loader=DictLoader({"base.html": BASE, "login.html": LOGIN, "item.html": ITEM, "lead.html": LEAD}),
                  autoescape=select_autoescape(default=True, default_for_string=True))


class VerdictBody(BaseModel):
    pair_id: str
    order_shown: str
    choice: str
    note: str = ""
    edited_attributes: dict = {}
    seconds_spent: float = 0.0


# --- the app -----------------------------------------------------------------------------------------------------
def create_app(lake_root: str, annotators: Path, seed: int = 0) -> FastAPI:
    app = FastAPI(title="SynPref review", docs_url=None, redoc_url=None)
    lake = Lake(lake_root)

    def user_of(request: Request) -> User:
        token = request.cookies.get(COOKIE)
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        user = _authenticate(annotators, token)
        if user is None:
            raise HTTPException(status_code=401, detail="a valid token is required")
        return user

    def queue() -> tuple[pl.DataFrame, str]:
        if not lake.exists(QUEUE):
            return pl.DataFrame(), ""
        q = lake.read(QUEUE)
        version = q["queue_version"].max()
        return q.filter(pl.col("queue_version") == version).sort("priority"), str(version)

    def next_item(user: User) -> tuple[dict | None, int, int, str]:
        q, version = queue()
        v = read_verdicts(lake)
        mine = set(v.filter(pl.col("annotator") == user.name)["pair_id"].to_list())
        counts = v.group_by("pair_id").agg(n=pl.col("annotator").n_unique()) if v.height else pl.DataFrame(
            schema={"pair_id": pl.String, "n": pl.UInt32})
        if q.height == 0:
            return None, len(mine), 0, version
        q = q.join(counts, on="pair_id", how="left").with_columns(n=pl.col("n").fill_null(0))
        open_ = q.filter(~pl.col("pair_id").is_in(list(mine))
                         & (pl.col("n") < pl.when(pl.col("overlap")).then(2).otherwise(1)))
        if open_.height == 0:
            return None, len(mine), 0, version
        head = open_.row(0, named=True)
        if head.get("chosen") is not None:  # the queue carries the text: no scan of raw_pairs per item shown
            pair = head
        else:
            pair = lake.scan(RAW).filter(pl.col("pair_id") == head["pair_id"]).collect().row(0, named=True)
        ann = {}
        if lake.exists(ANNOTATIONS):  # the latest successful attributes (the table is append-only)
            a = (lake.scan(ANNOTATIONS).filter((pl.col("pair_id") == head["pair_id"]) & (pl.col("status") == "ok"))
                 .sort("created_at").collect())
            ann = a.row(-1, named=True) if a.height else {}
        chosen_first = random.Random(f"{seed}|{user.name}|{head['pair_id']}").random() < 0.5
        c1, c2 = (pair["chosen"], pair["rejected"]) if chosen_first else (pair["rejected"], pair["chosen"])
        checks = {}
        if lake.exists(PRECHECKS):  # batched LLM pre-check of each response (objective pairs)
            pc = (lake.scan(PRECHECKS).filter((pl.col("pair_id") == head["pair_id"]) & (pl.col("status") == "ok"))
                  .sort("created_at").collect())
            checks = {r["side"]: f"{r['verdict']} ({r['model']}): {r['reason']}" for r in pc.iter_rows(named=True)}
        item = {"pair_id": head["pair_id"], "order": "chosen_first" if chosen_first else "rejected_first",
                "history": pair["history"], "c1": c1, "c2": c2, "why": head["why"],
                "task_category": ann.get("task_category") or head["task_category"],
                "objectivity": head["objectivity"], "controversiality": head["controversiality"],
                "desired": "; ".join(ann.get("desired_attributes") or []), "guideline": ann.get("guideline") or "",
                "check1": checks.get("chosen" if chosen_first else "rejected"),
                "check2": checks.get("rejected" if chosen_first else "chosen")}
        return item, len(mine), open_.height, version

    def submit(user: User, body: VerdictBody) -> dict:
        q, version = queue()
        if q.height == 0 or body.pair_id not in set(q["pair_id"].to_list()):
            raise HTTPException(status_code=404, detail="pair is not in the review queue")
        v = VerdictIn(pair_id=body.pair_id, annotator=user.name, role=user.role, order_shown=body.order_shown,
                      choice=body.choice, note=body.note, edited_attributes=body.edited_attributes,
                      seconds_spent=body.seconds_spent, queue_version=version)
        try:
            v.prefers()
        except ValueError as e:
            raise HTTPException(status_code=422, detail=str(e)) from e
        earlier = read_verdicts(lake).filter((pl.col("pair_id") == body.pair_id) & (pl.col("annotator") == user.name))
        version_written = append_verdicts(lake, [v])
        return {"ok": True, "ledger_version": version_written, "revised": earlier.height > 0}

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        if exc.status_code == 401:
            return HTMLResponse(ENV.get_template("login.html").render(user=None, error=None), status_code=401)
        return HTMLResponse(f"<p>{exc.status_code}</p>", status_code=exc.status_code)

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    @app.get("/login", response_class=HTMLResponse)
    def login_page():
        return ENV.get_template("login.html").render(user=None, error=None)

    @app.post("/login")
    def login(token: str = Form(...)):
        if _authenticate(annotators, token) is None:
            return HTMLResponse(ENV.get_template("login.html").render(user=None, error="unknown token"),
                                status_code=401)
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return resp

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request):
        user = user_of(request)
        item, done, remaining, version = next_item(user)
        return ENV.get_template("item.html").render(user=user, item=item, done=done, remaining=remaining,
                                                    queue_version=version, started=time.time())

    @app.post("/verdict")
    def verdict_form(request: Request, pair_id: str = Form(...), order_shown: str = Form(...),
                     choice: str = Form(...), note: str = Form(""), started: float = Form(0.0),
                     task_category: str = Form(""), guideline: str = Form("")):
        user = user_of(request)
        edits = {k: v for k, v in {"task_category": task_category, "guideline": guideline}.items() if v}
        submit(user, VerdictBody(pair_id=pair_id, order_shown=order_shown, choice=choice, note=note,
                                 edited_attributes=edits, seconds_spent=max(0.0, time.time() - started)))
        return RedirectResponse("/", status_code=303)

    @app.get("/api/next")
    def api_next(request: Request):
        item, done, remaining, version = next_item(user_of(request))
        return {"item": item, "done": done, "remaining": remaining, "queue_version": version}

    @app.post("/api/verdicts")
    def api_verdict(request: Request, body: VerdictBody):
        return submit(user_of(request), body)

    @app.get("/api/pairs/{pair_id}/verdicts")
    def api_pair_verdicts(request: Request, pair_id: str):
        user = user_of(request)
        v = read_verdicts(lake).filter(pl.col("pair_id") == pair_id)
        if user.role != "lead" and user.name not in set(v["annotator"].to_list()):
            raise HTTPException(status_code=403, detail="submit your own verdict first (blind review)")
        return {"verdicts": v.select("annotator", "prefers", "note", "created_at").with_columns(
            pl.col("created_at").dt.to_string()).to_dicts()}

    @app.get("/api/my-verdicts")
    def api_mine(request: Request):
        user = user_of(request)
        v = read_verdicts(lake).filter(pl.col("annotator") == user.name)
        return {"verdicts": v.select("pair_id", "prefers", "note").to_dicts()}

    @app.get("/lead", response_class=HTMLResponse)
    def lead(request: Request):
        user = user_of(request)
        if user.role != "lead":
            raise HTTPException(status_code=403, detail="lead only")
        v = read_verdicts(lake)
        thr = (v.group_by("annotator").agg(n=pl.len(), median_s=pl.col("seconds_spent").median(),
                                           discards=(pl.col("prefers") == "undecidable").sum()).sort("annotator")
               if v.height else pl.DataFrame())
        return ENV.get_template("lead.html").render(
            user=user, total=v.height, pairs=v["pair_id"].n_unique() if v.height else 0,
            discard_rate=float((v["prefers"] == "undecidable").mean()) if v.height else 0.0,
            throughput=thr.to_dicts() if thr.height else [], agreement=agreement_by_annotator(v).to_dicts() if v.height else [])

    return app
