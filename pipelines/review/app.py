"""The review web app: annotators verify queued pairs one at a time; leads watch throughput and agreement.

    synpref review add-annotator alice            # prints alice's token once (stored hashed)
    synpref review serve --port 8000

Serving: each annotator is handed one item at a time under a lease (`lease_ttl_s`, renewed by the open page's
heartbeat); a closed tab stops the heartbeat, the lease expires and the item goes back to the queue. Two annotators
get the same item only when it is one of the queue's double-annotated (`overlap`) items, and never one they
labelled. Annotators who disagree on an item send it to the adjudication queue (`/adjudicate`, leads only), whose
verdict is final in the seed. A request reads the rows of its item from the serving store (`store.ReviewStore`,
SQLite), never the queue or the ledger; the store follows the lake in the background (`sync.LakeSync`).

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
import logging
import random
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from jinja2 import DictLoader, Environment, select_autoescape
from pydantic import BaseModel

from pipelines.lake import Lake
from pipelines.review.ledger import (ADJUDICATOR_ROLE, COMPACT_EVERY, VerdictIn, agreement_by_annotator,
                                     agreement_by_batch, GroupCommit, progress_by_annotator, verdict_rows)
from pipelines.review.store import ReviewStore
from pipelines.review.sync import LakeSync

log = logging.getLogger(__name__)

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
 · <a href="/lead">lead view</a> · <a href="/adjudicate">adjudication queue</a>{% endif %} · <a href="/">next pair</a>
{% endif %}</div>
{% block body %}{% endblock %}</body></html>"""

LOGIN = """{% extends "base.html" %}{% block body %}<h2>Sign in</h2>
{% if error %}<p style="color:#b00">{{ error }}</p>{% endif %}
<form method="post" action="/login"><input name="token" type="password" placeholder="personal token" size="40"
autofocus> <button type="submit">Sign in</button></form>{% endblock %}"""

ITEM = """{% extends "base.html" %}{% block body %}
<p class="meta" id="progress">Progress: {{ p.done }} verdicts by you · {{ p.in_batch }} in batch {{ p.queue_version }}
 · {{ p.remaining }} pairs left in queue {{ p.queue_version }} · {{ p.awaiting_adjudication }} awaiting adjudication</p>
{% if not item %}<h2 id="empty">{% if kind == 'adjudicate' %}No disagreement waits for you.{% else %}Nothing left to
review. Thank you!{% endif %}</h2>{% else %}
{% if kind == 'adjudicate' %}<h2>Adjudication: the annotators disagree; your verdict is final</h2>
<table id="votes"><tr><th>annotator</th><th>verdict</th><th>note</th></tr>{% for v in item.votes %}
<tr><td>{{ v.annotator }}</td><td>{{ v.shown }}</td><td>{{ v.note }}</td></tr>{% endfor %}</table>{% endif %}
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
<input type="hidden" name="kind" value="{{ kind }}">
<input type="hidden" name="choice" id="choice" value="">
<p><label>Note <input name="note" size="60"></label></p>
<p><label>Task category (edit if wrong) <input name="task_category" value="{{ item.task_category }}"></label>
<label>Guideline (edit if wrong) <input name="guideline" size="50" value="{{ item.guideline }}"></label></p>
<button type="button" onclick="pick('1')">Candidate 1 better [1]</button>
<button type="button" onclick="pick('2')">Candidate 2 better [2]</button>
<button type="button" onclick="pick('undecidable')">Cannot decide — discard [0]</button></form>
<p class="meta" id="lease">Held for you for {{ ttl }} s while this page is open.</p>
<script>function pick(c){document.getElementById('choice').value=c;document.getElementById('vform').submit();}
document.addEventListener('keydown',function(e){if(e.target.tagName==='INPUT')return;
if(e.key==='1')pick('1');else if(e.key==='2')pick('2');else if(e.key==='0'||e.key==='u')pick('undecidable');});
function heartbeat(){return fetch('/api/leases/renew',{method:'POST',headers:{'Content-Type':'application/json'},
body:JSON.stringify({pair_id:{{ item.pair_id|tojson }}})}).then(function(r){if(r.status===409)
document.getElementById('lease').textContent='Your hold on this pair expired; a verdict is still recorded.';
return r.status;});}
setInterval(heartbeat,{{ heartbeat_ms }});
</script>{% endif %}{% endblock %}"""

LEAD = """{% extends "base.html" %}{% block body %}<h2>Lead view</h2>
<p>{{ total }} verdicts on {{ pairs }} pairs · discard rate {{ '%.1f'|format(discard_rate * 100) }}%</p>
<p id="batch">Batch {{ batch.queue_version }}: {{ batch.items }} items, {{ batch.open }} open,
{{ batch.double_annotated }} double-annotated, {{ batch.disputed }} disputed, {{ batch.adjudicated }} adjudicated ·
<a href="/adjudicate">{{ awaiting }} awaiting adjudication</a></p>
<h3>Progress per annotator</h3><table id="progress"><tr><th>annotator</th><th>pairs</th><th>in batch</th>
<th>verdicts</th><th>adjudications</th><th>median seconds</th><th>discards</th><th>holding now</th></tr>
{% for r in progress %}<tr><td>{{ r.annotator }}</td><td>{{ r.pairs }}</td><td>{{ r.in_batch }}</td>
<td>{{ r.verdicts }}</td><td>{{ r.adjudications }}</td><td>{{ '%.1f'|format(r.median_s or 0) }}</td>
<td>{{ r.discards }}</td><td>{{ r.holding }}</td></tr>{% endfor %}</table>
<h3>Agreement per batch (double-annotated items)</h3><table id="agreement-batch"><tr><th>batch</th>
<th>overlap items</th><th>agreement</th><th>kappa</th></tr>
{% for r in by_batch %}<tr><td>{{ r.queue_version }}</td><td>{{ r.overlap_items }}</td>
<td>{{ '%.2f'|format(r.agreement) }}</td><td>{{ 'n/a' if r.kappa is none else '%.2f'|format(r.kappa) }}</td></tr>
{% endfor %}</table>
<h3>Agreement per annotator</h3><table id="agreement"><tr><th>annotator</th><th>overlap items</th>
<th>agreement</th><th>kappa</th></tr>
{% for r in agreement %}<tr><td>{{ r.annotator }}</td><td>{{ r.overlap_items }}</td>
<td>{{ '%.2f'|format(r.agreement) }}</td><td>{{ 'n/a' if r.kappa is none else '%.2f'|format(r.kappa) }}</td></tr>
{% endfor %}</table>
<p class="meta">kappa: Cohen's (scikit-learn) against co-annotators; per batch over both orders of each pair
(Scott's pi / Fleiss' kappa for two raters). n/a: one label only, chance agreement is 1.</p>{% endblock %}"""

ENV = Environment(loader=DictLoader({"base.html": BASE, "login.html": LOGIN, "item.html": ITEM, "lead.html": LEAD}),
                  autoescape=select_autoescape(default=True, default_for_string=True))


class VerdictBody(BaseModel):
    pair_id: str
    order_shown: str
    choice: str
    note: str = ""
    edited_attributes: dict = {}
    seconds_spent: float = 0.0


class LeaseBody(BaseModel):
    pair_id: str


def store_path_for(annotators: Path, lake_root: str) -> Path:
    """The serving store lives next to the annotators file, one per lake (two lakes never share leases)."""
    return annotators.parent / f"review-{hashlib.sha256(lake_root.encode()).hexdigest()[:12]}.sqlite"


# --- the app -----------------------------------------------------------------------------------------------------
class ReviewService:
    """Everything a request needs, and nothing per request: the serving store (leases, items, votes), the lake
    sync, the ledger writer, and the rules (who may see and submit what). The routes in `create_app` only parse,
    call one method and render."""

    def __init__(self, lake_root: str, annotators: Path, seed: int, lease_ttl_s: float, sync_every_s: float,
                 store_path: Path | None, clock: Callable[[], float], compact_every: int):
        self.annotators, self.seed, self.lease_ttl_s, self.sync_every_s = annotators, seed, lease_ttl_s, sync_every_s
        lake = Lake(lake_root)
        self.store = ReviewStore(store_path or store_path_for(Path(annotators), lake.root), clock=clock)
        self.syncer = LakeSync(lake, self.store)
        self.ledger = GroupCommit(lake, compact_every)
        self._stop = threading.Event()
        self._last_sync = 0.0

    # --- keeping the store in step with the lake ---
    def sync_now(self) -> dict:
        self._last_sync = time.monotonic()
        return self.syncer.sync()

    def _loop(self) -> None:
        while not self._stop.wait(self.sync_every_s):
            try:
                self.sync_now()
            except Exception:  # a transient lake error must not end the loop; the next pass retries
                log.exception("review store sync failed")

    @asynccontextmanager
    async def lifespan(self, _app: FastAPI):
        self.sync_now()
        th = threading.Thread(target=self._loop, name="review-sync", daemon=True)
        th.start()
        yield
        self._stop.set()
        th.join(10)

    # --- who is asking ---
    def user_of(self, request: Request) -> User:
        token = request.cookies.get(COOKIE)
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        user = _authenticate(self.annotators, token)
        if user is None:
            raise HTTPException(status_code=401, detail="a valid token is required")
        return user

    def lead_of(self, request: Request) -> User:
        user = self.user_of(request)
        if user.role != "lead":
            raise HTTPException(status_code=403, detail="lead only")
        return user

    # --- handing out items ---
    def shown(self, user: User, pair_id: str, kind: str) -> dict:
        """An item as this annotator sees it: candidates in a seeded order per (annotator, pair); for an
        adjudication, what each annotator said, in this page's candidate order."""
        it = self.store.item(pair_id)
        chosen_first = random.Random(f"{self.seed}|{user.name}|{pair_id}").random() < 0.5
        c1, c2 = (it["chosen"], it["rejected"]) if chosen_first else (it["rejected"], it["chosen"])
        checks = it["checks"]
        item = {"pair_id": pair_id, "order": "chosen_first" if chosen_first else "rejected_first",
                "history": it["history"] or [], "c1": c1, "c2": c2, "why": it["why"],
                "task_category": it["task_category"], "objectivity": it["objectivity"],
                "controversiality": it["controversiality"], "desired": it.get("desired") or "",
                "guideline": it.get("guideline") or "", "queue_version": it["queue_version"],
                "check1": checks.get("chosen" if chosen_first else "rejected"),
                "check2": checks.get("rejected" if chosen_first else "chosen")}
        if kind == "adjudicate":
            side = {"chosen": "Candidate 1" if chosen_first else "Candidate 2",
                    "rejected": "Candidate 2" if chosen_first else "Candidate 1", "undecidable": "cannot decide"}
            item["votes"] = [{"annotator": v["annotator"], "shown": side[v["prefers"]], "note": v["note"] or ""}
                             for v in self.store.votes(pair_id) if v["role"] != ADJUDICATOR_ROLE]
        return item

    def next_item(self, user: User, kind: str = "annotate") -> tuple[dict | None, dict, float | None]:
        claim = self.store.claim if kind == "annotate" else self.store.claim_adjudication
        lease = claim(user.name, self.lease_ttl_s)
        if lease is None and time.monotonic() - self._last_sync > min(self.sync_every_s, 1.0):
            self.sync_now()  # a batch just queued elsewhere: look once before saying there is nothing
            lease = claim(user.name, self.lease_ttl_s)
        item = self.shown(user, lease.pair_id, kind) if lease else None
        return item, self.store.progress(user.name), lease.expires_at if lease else None

    def submit(self, user: User, body: VerdictBody, adjudicate: bool = False) -> dict:
        """A verdict by the token's owner: the ledger first (it is the record), then the store (a crash between
        the two: the next sync brings the row in)."""
        it = self.store.item(body.pair_id)
        if it is None:
            raise HTTPException(status_code=404, detail="pair is not in the review queue")
        if adjudicate:
            if user.role != "lead":
                raise HTTPException(status_code=403, detail="adjudication is for leads")
            if not it["disputed"]:
                raise HTTPException(status_code=409, detail="the annotators do not disagree on this pair")
        v = VerdictIn(pair_id=body.pair_id, annotator=user.name, role=ADJUDICATOR_ROLE if adjudicate else "annotator",
                      order_shown=body.order_shown, choice=body.choice, note=body.note,
                      edited_attributes=body.edited_attributes, seconds_spent=body.seconds_spent,
                      queue_version=it["queue_version"])
        try:
            v.prefers()
        except ValueError as e:
            raise HTTPException(status_code=422, detail=str(e)) from e
        revised = self.store.has_voted(body.pair_id, user.name)
        held = any(x["pair_id"] == body.pair_id and x["annotator"] == user.name
                   for x in self.store.leases_of(user.name))
        rows = verdict_rows([v])
        version_written = self.ledger.append(rows)
        self.store.add_verdicts(rows)
        return {"ok": True, "ledger_version": version_written, "revised": revised, "lease_held": held}

    # --- pages ---
    def page(self, user: User, kind: str) -> str:
        item, progress, _ = self.next_item(user, kind)
        return ENV.get_template("item.html").render(
            user=user, item=item, p=progress, kind=kind, started=time.time(), ttl=int(self.lease_ttl_s),
            heartbeat_ms=max(1000, int(self.lease_ttl_s * 1000 / 3)))

    def lead_page(self, user: User) -> str:
        """The lead's overview: the one page that aggregates the whole ledger (from the store, not the lake)."""
        store = self.store
        v = store.verdict_frame()
        batch = store.batch_status()
        prog = progress_by_annotator(v, batch["queue_version"]).to_dicts()
        holding: dict[str, int] = {}
        for x in store.leases():
            holding[x["annotator"]] = holding.get(x["annotator"], 0) + 1
        for r in prog:
            r["holding"] = holding.get(r["annotator"], 0)
        ov = store.verdict_frame(overlap_only=True)
        return ENV.get_template("lead.html").render(
            user=user, total=v.height, pairs=v["pair_id"].n_unique() if v.height else 0,
            discard_rate=float((v["prefers"] == "undecidable").mean()) if v.height else 0.0, batch=batch,
            awaiting=store.awaiting_adjudication(), progress=prog, by_batch=agreement_by_batch(ov).to_dicts(),
            agreement=agreement_by_annotator(ov).to_dicts())

    def agreement(self) -> dict:
        ov = self.store.verdict_frame(overlap_only=True)
        return {"by_batch": agreement_by_batch(ov).to_dicts(), "by_annotator": agreement_by_annotator(ov).to_dicts(),
                "awaiting_adjudication": self.store.awaiting_adjudication()}

    def pair_verdicts(self, user: User, pair_id: str) -> dict:
        if user.role != "lead" and not self.store.has_voted(pair_id, user.name):
            raise HTTPException(status_code=403, detail="submit your own verdict first (blind review)")
        return {"verdicts": [{**v, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(v["created_at"]))}
                             for v in self.store.history(pair_id)]}


def create_app(lake_root: str, annotators: Path, seed: int = 0, *, lease_ttl_s: float = 600.0,
               sync_every_s: float = 2.0, store_path: Path | None = None, clock: Callable[[], float] = time.time,
               compact_every: int = COMPACT_EVERY) -> FastAPI:
    """lease_ttl_s: how long an item stays with an annotator without a heartbeat or a verdict (the open page
    renews it every third of it). sync_every_s: how often verdicts and batches written elsewhere are picked up.
    clock: seconds, for leases (tests move it instead of sleeping)."""
    svc = ReviewService(lake_root, annotators, seed, lease_ttl_s, sync_every_s, store_path, clock, compact_every)
    app = FastAPI(title="SynPref review", docs_url=None, redoc_url=None, lifespan=svc.lifespan)
    app.state.store, app.state.sync = svc.store, svc.syncer

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        if exc.status_code == 401:
            return HTMLResponse(ENV.get_template("login.html").render(user=None, error=None), status_code=401)
        return HTMLResponse(f"<p>{exc.status_code}</p>", status_code=exc.status_code)

    _page_routes(app, svc)
    _api_routes(app, svc)
    return app


def _page_routes(app: FastAPI, svc: ReviewService) -> None:
    """The HTML pages: login (token to cookie), the item page, adjudication and the lead's overview."""

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    @app.get("/login", response_class=HTMLResponse)
    def login_page():
        return ENV.get_template("login.html").render(user=None, error=None)

    @app.post("/login")
    def login(token: str = Form(...)):
        if _authenticate(svc.annotators, token) is None:
            return HTMLResponse(ENV.get_template("login.html").render(user=None, error="unknown token"),
                                status_code=401)
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return resp

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request):
        return svc.page(svc.user_of(request), "annotate")

    @app.get("/adjudicate", response_class=HTMLResponse)
    def adjudicate_page(request: Request):
        return svc.page(svc.lead_of(request), "adjudicate")

    @app.post("/verdict")
    def verdict_form(request: Request, pair_id: str = Form(...), order_shown: str = Form(...),
                     choice: str = Form(...), note: str = Form(""), started: float = Form(0.0),
                     task_category: str = Form(""), guideline: str = Form(""), kind: str = Form("annotate")):
        user = svc.user_of(request)
        edits = {k: v for k, v in {"task_category": task_category, "guideline": guideline}.items() if v}
        svc.submit(user, VerdictBody(pair_id=pair_id, order_shown=order_shown, choice=choice, note=note,
                                     edited_attributes=edits, seconds_spent=max(0.0, time.time() - started)),
                   adjudicate=kind == "adjudicate")
        return RedirectResponse("/adjudicate" if kind == "adjudicate" else "/", status_code=303)

    @app.get("/lead", response_class=HTMLResponse)
    def lead(request: Request):
        return svc.lead_page(svc.lead_of(request))


def _api_routes(app: FastAPI, svc: ReviewService) -> None:
    """The JSON API (the same rules as the pages; `Authorization: Bearer <token>`)."""

    @app.get("/api/next")
    def api_next(request: Request):
        item, progress, expires = svc.next_item(svc.user_of(request))
        return {"item": item, "done": progress["done"], "remaining": progress["remaining"],
                "queue_version": progress["queue_version"], "progress": progress, "lease_expires_at": expires}

    @app.get("/api/adjudications/next")
    def api_next_adjudication(request: Request):
        item, progress, expires = svc.next_item(svc.lead_of(request), "adjudicate")
        return {"item": item, "progress": progress, "lease_expires_at": expires}

    @app.post("/api/verdicts")
    def api_verdict(request: Request, body: VerdictBody):
        return svc.submit(svc.user_of(request), body)

    @app.post("/api/adjudications")
    def api_adjudication(request: Request, body: VerdictBody):
        return svc.submit(svc.user_of(request), body, adjudicate=True)

    @app.post("/api/leases/renew")
    def api_renew(request: Request, body: LeaseBody):
        if not svc.store.renew(svc.user_of(request).name, body.pair_id, svc.lease_ttl_s):
            raise HTTPException(status_code=409, detail="the lease expired or was never yours")
        return {"ok": True}

    @app.post("/api/leases/release")
    def api_release(request: Request, body: LeaseBody):
        """Hand an item back now (skip) instead of waiting for the lease to expire."""
        return {"released": svc.store.release(svc.user_of(request).name, body.pair_id)}

    @app.get("/api/progress")
    def api_progress(request: Request):
        return {"progress": svc.store.progress(svc.user_of(request).name)}

    @app.get("/api/agreement")
    def api_agreement(request: Request):
        svc.lead_of(request)
        return svc.agreement()

    @app.post("/api/sync")
    def api_sync(request: Request):
        """Pick up what was written to the lake elsewhere now, rather than at the next background pass."""
        svc.lead_of(request)
        return svc.sync_now()

    @app.get("/api/pairs/{pair_id}/verdicts")
    def api_pair_verdicts(request: Request, pair_id: str):
        return svc.pair_verdicts(svc.user_of(request), pair_id)

    @app.get("/api/my-verdicts")
    def api_mine(request: Request):
        return {"verdicts": svc.store.mine(svc.user_of(request).name)}
