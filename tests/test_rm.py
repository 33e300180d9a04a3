import json
import math
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipelines.evaluate.harness import wilson_interval
from pipelines.rm.data import LengthPolicy, OverLength, Renderer, encode_pairs
from pipelines.rm.losses import pair_losses, reward_loss
from pipelines.rm.model import PAD_TOKEN, load_reward_model
from pipelines.rm.score import score_rows, score_texts
from pipelines.rm.tiny import build_tiny_decoder
from pipelines.rm.train import (LAYOUTS, TrainConfig, choose_layout, forward_packed, forward_pairs,
                                 forward_shared_prefix, train_reward_model)
from pipelines.settings import minilm_path
from tests.rm_helpers import synth_rows
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return build_tiny_decoder(tmp_path_factory.mktemp("tiny") / "qwen3", "qwen3")


def test_each_loss_matches_its_definition_on_a_fixed_batch():
    import math

    rc = torch.tensor([2.0, 0.0])
    rr = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # two rejected each; the second pair's second is padding
    mask = torch.tensor([[True, True], [True, False]])
    ls = lambda x: math.log(1 / (1 + math.exp(-x)))  # noqa: E731  log sigmoid
    bt = [-(ls(2.0) + ls(1.0)) / 2, -ls(-1.0)]  # K-negative BT: mean over a pair's real rejected
    got = pair_losses(rc, rr, kind="bt", mask=mask)
    assert got.tolist() == pytest.approx(bt)
    margin = torch.tensor([0.5, 1.0])
    mbt = [-(ls(2.0 - 0.5) + ls(1.0 - 0.5)) / 2, -ls(-1.0 - 1.0)]
    assert pair_losses(rc, rr, kind="margin_bt", margin=margin, mask=mask).tolist() == pytest.approx(mbt)
    assert all(m > b for m, b in zip(mbt, bt))  # a margin asks for a larger gap: same rewards, larger loss
    lw = [-(2.0 - math.log(math.exp(2.0) + math.exp(0.0) + math.exp(1.0))),
          -(0.0 - math.log(math.exp(0.0) + math.exp(1.0)))]  # -log softmax([r_w, r_l...])[0], padding excluded
    assert pair_losses(rc, rr, kind="listwise", mask=mask).tolist() == pytest.approx(lw)
    c = pair_losses(rc, rr, kind="bt", mask=mask, center_coef=0.1)
    assert c.tolist() == pytest.approx([bt[0] + 0.1 * (2.0 + 0.5) ** 2, bt[1] + 0.1 * (0.0 + 1.0) ** 2])
    assert reward_loss(rc, rr, kind="bt", mask=mask) == pytest.approx(sum(bt) / 2)
    with pytest.raises(ValueError, match="margin"):
        pair_losses(rc, rr, kind="margin_bt")
    with pytest.raises(ValueError):
        pair_losses(rc, rr, kind="nope")


def test_margin_and_several_rejected_reach_the_trainer(tiny_qwen, tmp_path):
    """`margin` and `rejected_more` columns of the training rows reach the loss; margin_bt without margins fails."""
    rows = synth_rows(12, seed=9)
    wide = [{**r, "margin": 1.0, "rejected_more": [r["rejected"] + " also wrong"]} for r in rows]
    rm = load_reward_model(tiny_qwen)
    enc, _ = encode_pairs(Renderer(rm, 256), wide)
    assert all(len(p.rejected_all) == 2 and p.margin == 1.0 for p in enc)
    for layout in ("pairs", "shared_prefix", "packed"):
        with torch.no_grad():
            rc, rr, mask = LAYOUTS[layout](rm, enc[:4])
        assert rr.shape == (4, 2) and mask.all()
        if layout == "pairs":
            ref = rr.clone()
        else:
            assert torch.allclose(rr, ref, atol=1e-4), layout  # every layout gives the same rewards
    cfg = TrainConfig(lr=1e-3, batch_size=4, epochs=1, max_len=256, loss="listwise", progress=False, eval_every=100)
    res = train_reward_model(rm, wide, wide[:4], cfg, str(tmp_path / "lw"))
    assert res.steps == 3 and all(math.isfinite(h["loss"]) for h in res.history)
    # the rule for pairs without a stated strength: margin 0, i.e. their term is plain BT (counted, not refused)
    cfg = TrainConfig(lr=1e-3, batch_size=4, epochs=1, max_len=256, progress=False, eval_every=100)
    plain = train_reward_model(load_reward_model(tiny_qwen), rows, [], cfg, str(tmp_path / "bt"))
    cfg.loss = "margin_bt"
    mixed = [{**r, "margin": 2.0} if i % 2 else r for i, r in enumerate(rows)]
    res = train_reward_model(load_reward_model(tiny_qwen), rows, [], cfg, str(tmp_path / "m"))
    assert res.pairs_without_margin == len(rows) and plain.pairs_without_margin == 0
    assert [h["loss"] for h in res.history] == pytest.approx([h["loss"] for h in plain.history], abs=1e-6)
    res2 = train_reward_model(load_reward_model(tiny_qwen), mixed, [], cfg, str(tmp_path / "m2"))
    assert res2.pairs_without_margin == len(rows) - len(rows) // 2
    assert res2.history[0]["loss"] > plain.history[0]["loss"]  # a stated margin asks for a larger gap


def test_decoder_gets_a_dedicated_pad_token_and_single_bos(tiny_qwen):
    rm = load_reward_model(tiny_qwen)
    assert rm.is_decoder and rm.tokenizer.pad_token == PAD_TOKEN
    assert rm.model.config.pad_token_id == rm.tokenizer.pad_token_id != rm.tokenizer.eos_token_id
    ids, prefix = Renderer(rm, 512).render([{"role": "user", "content": "hi"}], "hello")
    assert ids.count(rm.tokenizer.bos_token_id) == 1 and ids[0] == rm.tokenizer.bos_token_id
    assert "system" not in rm.tokenizer.decode(ids)  # no system prompt injected
    assert rm.tokenizer.decode(ids[prefix:]).startswith("hello")


def test_score_read_at_last_real_token_for_left_and_right_padding(tiny_qwen):
    rm = load_reward_model(tiny_qwen)
    rm.model.eval()
    r = Renderer(rm, 512)
    seqs = [r.render([{"role": "user", "content": "q" * (i + 1)}], "answer " * (3 * i + 1))[0] for i in range(4)]
    with torch.no_grad():
        alone = [float(rm.model(input_ids=torch.tensor([s])).logits[0, 0]) for s in seqs]
        n = max(map(len, seqs))
        pad = rm.tokenizer.pad_token_id
        for side in ("right", "left"):
            ids = torch.full((4, n), pad)
            mask = torch.zeros((4, n), dtype=torch.long)
            for i, s in enumerate(seqs):
                sl = slice(0, len(s)) if side == "right" else slice(n - len(s), n)
                ids[i, sl] = torch.tensor(s)
                mask[i, sl] = 1
            batched = rm.model(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()
            assert batched == pytest.approx(alone, abs=1e-4), side


def test_shared_prefix_layout_equals_separate_rows(tiny_qwen):
    rm = load_reward_model(tiny_qwen)
    rm.model.eval()
    enc, _ = encode_pairs(Renderer(rm, 512), synth_rows(6, seed=3))
    with torch.no_grad():
        a, b, c = (torch.cat([x[0], x[1][:, 0]]) for x in (forward_pairs(rm, enc), forward_shared_prefix(rm, enc),
                                                           forward_packed(rm, enc)))
    assert torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(a, c, atol=1e-4)  # padding-free packing: same rewards


def test_collated_micro_batches_hold_no_square_mask():
    """What a loader worker builds (and /dev/shm carries) is linear in the tokens: one segment id per token,
    never an L x L pattern (a 32k row would be 1 GB of mask)."""
    from pipelines.rm.collate import collate_packed, collate_shared_prefix
    from pipelines.rm.data import Encoded, EncodedPair

    hist = list(range(3, 603))
    pairs = [EncodedPair(f"p{i}", Encoded(hist + [7] * (50 + i), 600), Encoded(hist + [8] * 40, 600),
                         [Encoded(hist + [9] * 30, 600)]) for i in range(3)]
    for b in (collate_shared_prefix(pairs, 0), collate_packed(pairs)):
        L = b.inputs["input_ids"].shape[-1]
        tensors = [*b.inputs.values(), b.segment, b.reads, b.rejected_index, b.mask]
        assert sum(t.numel() for t in tensors) <= 8 * 3 * L, b.layout  # an L x L tensor would be >= L^2
        assert b.segment.shape == b.inputs["input_ids"].shape
    sp = collate_shared_prefix(pairs, 0)
    row = sp.segment[0]
    assert (row[:600] == 0).all() and (row[600:650] == 1).all() and (row[650:690] == 2).all() \
        and (row[690:720] == 3).all() and (row[720:] == -1).all()  # history, chosen, rejected x2, padding


def test_flex_attention_scores_as_the_dense_masks_do(tiny_qwen):
    """The same model under FlexAttention (BlockMasks from the segment ids) and under sdpa (dense masks built on
    the device) gives the same rewards in every layout. FlexAttention runs forward-only on CPU (evaluation)."""
    enc, _ = encode_pairs(Renderer(load_reward_model(tiny_qwen), 512), synth_rows(6, seed=3))
    got = {}
    for impl, layouts in (("sdpa", (forward_pairs, forward_shared_prefix, forward_packed)),
                          ("flex_attention", (forward_shared_prefix, forward_packed))):  # where segment ids matter
        rm = load_reward_model(tiny_qwen, attn_implementation=impl)
        assert rm.model.config._attn_implementation == impl
        rm.model.eval()
        with torch.no_grad():
            got[impl] = [torch.cat([x[0], x[1][:, 0]]) for x in (f(rm, enc) for f in layouts)]
    for a in (*got["sdpa"], *got["flex_attention"]):
        assert torch.allclose(got["sdpa"][0], a, atol=1e-4)


def test_attention_kernel_chosen_by_the_device_and_settable(tiny_qwen, tmp_path):
    from pipelines.rm.attention import resolve_attn_implementation
    from pipelines.rm.memory import estimate

    assert resolve_attn_implementation("auto", "cpu", decoder=True) == "sdpa"
    assert resolve_attn_implementation("auto", "cuda", decoder=True) in ("flex_attention", "flash_attention_2")
    assert resolve_attn_implementation("auto", "cuda", decoder=False) is None  # encoders: transformers' default
    assert resolve_attn_implementation("", "cuda", decoder=True) is None
    with pytest.raises(ValueError, match="attn_implementation=auto"):
        resolve_attn_implementation("flash_attention_2", "cpu", decoder=True)
    with pytest.raises(ValueError, match="must be one of"):
        resolve_attn_implementation("flash", "cpu", decoder=True)
    rm = load_reward_model(tiny_qwen, attn_implementation="auto")
    assert rm.model.config._attn_implementation == "sdpa"
    # the BlockMask leaves no L x L term in the memory plan; the dense masks do
    plan = {impl: estimate(rm.model, device=torch.device("cpu"), layout="shared_prefix", longest_row=4096, width=1,
                           world=1, sharded=False, compute_bytes=4, optimizer="adamw", grad_checkpointing=False,
                           attn_implementation=impl, limit=1 << 40) for impl in ("sdpa", "flex_attention")}
    assert plan["sdpa"].peak(4096) - plan["flex_attention"].peak(4096) >= 4096 * 4096
    # training under FlexAttention on CPU is refused before the first step, naming the setting
    flex = load_reward_model(tiny_qwen, attn_implementation="flex_attention")
    cfg = TrainConfig(batch_size=4, max_steps=1, max_len=128, progress=False, layout="shared_prefix")
    with pytest.raises(ValueError, match="attn_implementation=auto or sdpa"):
        train_reward_model(flex, synth_rows(8), synth_rows(4, seed=1), cfg, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_packed_layout_learns_and_auto_picks_it_only_for_varlen_kernels(tiny_qwen, tmp_path):
    rm = load_reward_model(tiny_qwen)
    assert choose_layout(rm, "auto") == "shared_prefix"  # sdpa: no varlen kernel on CPU
    rm.model.config._attn_implementation = "flash_attention_2"
    assert choose_layout(rm, "auto") == "packed"
    rm = load_reward_model(tiny_qwen)
    rows = synth_rows(32, seed=5)
    cfg = TrainConfig(lr=3e-3, batch_size=8, epochs=6, max_len=256, layout="packed", eval_every=1000, progress=False)
    res = train_reward_model(rm, rows, rows, cfg, str(tmp_path / "out"))
    assert res.best_val_accuracy >= 0.9
    with pytest.raises(ValueError, match="layout"):
        choose_layout(rm, "varlen")


def test_length_policy_is_explicit_and_counted():
    rm = load_reward_model(minilm_path())
    long_hist = [{"role": "user", "content": "word " * 400}]
    rows = [{"pair_id": "a", "history": long_hist, "chosen": "good answer", "rejected": "bad answer"},
            {"pair_id": "b", "history": [{"role": "user", "content": "q"}], "chosen": "x " * 400, "rejected": "y"},
            {"pair_id": "c", "history": [{"role": "user", "content": "q"}], "chosen": "ok", "rejected": "no"}]
    enc, rep = encode_pairs(Renderer(rm, 64, LengthPolicy.TRUNCATE), rows)
    assert [e.pair_id for e in enc] == ["a", "c"] and rep.as_dict() == {"pairs": 3, "truncated": 1, "dropped": 1}
    assert rm.tokenizer.decode(enc[0].chosen.ids).endswith("good answer [SEP]")  # the response survives
    assert len(enc[0].chosen.ids) == 64
    enc, rep = encode_pairs(Renderer(rm, 64, LengthPolicy.DROP), rows)
    assert [e.pair_id for e in enc] == ["c"] and rep.dropped_ids == ["a", "b"]
    with pytest.raises(OverLength):
        encode_pairs(Renderer(rm, 64, LengthPolicy.FAIL), rows)


@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_a_pair_is_truncated_as_one_so_both_responses_see_the_same_history(which, tiny_qwen):
    rm = load_reward_model(minilm_path() if which == "encoder" else tiny_qwen)
    hist = [{"role": "user", "content": " ".join(f"w{i}" for i in range(300))}]
    pair, rep = encode_pairs(Renderer(rm, 128), [{"pair_id": "a", "history": hist, "chosen": "short",
                                                   "rejected": "a longer answer " * 3}])
    assert rep.as_dict() == {"pairs": 1, "truncated": 1, "dropped": 0}
    c, r = pair[0].chosen, pair[0].rejected
    assert c.truncated == r.truncated > 0 and max(len(c.ids), len(r.ids)) == 128 > min(len(c.ids), len(r.ids))
    assert c.prefix_len == r.prefix_len and c.ids[:c.prefix_len] == r.ids[:r.prefix_len]  # one context
    assert pair[0].shared >= c.prefix_len - 1 and pair[0].row_len("shared_prefix") < pair[0].tokens


@pytest.mark.parametrize("which", ["encoder", "chat_decoder", "plain_decoder"])
def test_batched_rendering_equals_one_response_at_a_time(which, tiny_qwen):
    rm = load_reward_model(minilm_path() if which == "encoder" else tiny_qwen)
    if which == "plain_decoder":
        rm.tokenizer.chat_template = None
    r = Renderer(rm, 128)
    history = [{"role": "user", "content": "what is a reward model " * 3},
               {"role": "assistant", "content": "a scorer"}, {"role": "user", "content": "and?"}]
    responses = ["it ranks answers", "", "x " * 40, "it scores\nlines"]
    many = r.render_many(history, responses)
    assert many == [r.render(history, x) for x in responses]
    assert all(0 < prefix < len(ids) for ids, prefix in many)
    assert len({tuple(ids[:prefix]) for ids, prefix in many}) == 1  # one rendering of the history for all


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_history_tokenized_once_gives_the_ids_of_one_call_per_full_text(arch, lake, hh_path, tmp_path):
    """The renderer tokenizes a history once for all its responses (split at its last special token): on real
    multi-turn hh-rlhf conversations and edge responses (leading space, empty, newlines) the ids equal tokenizing
    each full rendering alone, and the history count equals its own tokenization's common prefix."""
    from pipelines.ingest.run import ingest_shard
    from pipelines.rm.model import load_tokenizer

    ingest_shard(lake, hh_path, source="hh", shard="hh/test", run_id="r")
    rows = lake.read("raw_pairs").sort("pair_id").head(300).to_dicts()
    r = Renderer(load_tokenizer(build_tiny_decoder(tmp_path / arch, arch)), 10**6)
    assert r._split is not None  # the fast path is the one under test
    items = [(x["history"], [x["chosen"], x["rejected"], " " + x["chosen"], "", "\n\nx"]) for x in rows]
    for (history, responses), got in zip(items, r.render_batch(items)):
        head = r._strip_bos(r.tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True))
        hids = r.tok(head)["input_ids"]
        for resp, (ids, n) in zip(responses, got):
            full = r.tok(r._strip_bos(r.tok.apply_chat_template(
                history + [{"role": "assistant", "content": resp}], tokenize=False)))["input_ids"]
            k = next((i for i, (a, b) in enumerate(zip(full, hids)) if a != b), min(len(full), len(hids)))
            assert (ids, n) == (full, k)


def test_train_and_score_tokenize_identically(tiny_qwen):
    rm = load_reward_model(tiny_qwen)
    rows = synth_rows(5, seed=4)
    enc, _ = encode_pairs(Renderer(rm, 256), rows)
    rm.model.eval()
    with torch.no_grad():
        rc, rr, _ = forward_pairs(rm, enc)
        rr = rr[:, 0]
    scored, _ = score_rows(rm, rows, "v", max_len=256)
    by_id = {r["pair_id"]: r for r in scored.iter_rows(named=True)}
    for e, c, r in zip(enc, rc.tolist(), rr.tolist()):
        assert by_id[e.pair_id]["r_chosen"] == pytest.approx(c, abs=1e-5)
        assert by_id[e.pair_id]["r_rejected"] == pytest.approx(r, abs=1e-5)


@pytest.mark.slow
def test_tiny_decoder_overfits_32_pairs_and_round_trips_through_hf(tiny_qwen, tmp_path):
    rm = load_reward_model(tiny_qwen)
    rows = synth_rows(32, seed=5)
    cfg = TrainConfig(lr=2e-3, batch_size=8, epochs=25, max_len=128, eval_every=40, progress=False, layout="shared_prefix")
    res = train_reward_model(rm, rows, rows, cfg, str(tmp_path / "out"))
    assert res.best_val_accuracy >= 0.97, res.history[-1]
    # plain HF + the Skywork README recipe (chat template, strip BOS, logits[0][0]) gives the same scores
    hf = AutoModelForSequenceClassification.from_pretrained(res.best_dir).eval()
    tok = AutoTokenizer.from_pretrained(res.best_dir)
    ours = score_texts(load_reward_model(res.best_dir), [(r["history"], r["chosen"]) for r in rows[:4]], max_len=1024)
    for r, s in zip(rows[:4], ours):
        text = tok.apply_chat_template(r["history"] + [{"role": "assistant", "content": r["chosen"]}], tokenize=False)
        if text.startswith(tok.bos_token):
            text = text[len(tok.bos_token):]
        with torch.no_grad():
            ref = hf(**tok(text, return_tensors="pt")).logits[0][0].item()
        assert ref == pytest.approx(s, abs=1e-4)
    # the kept checkpoint carries its calibration: mean/std of its rewards on the selection set, as scored offline
    from pipelines.rm.calibration import Calibration

    cal = Calibration.of_folder(res.best_dir)
    scored, _ = score_rows(load_reward_model(res.best_dir), rows, "v", max_len=128)  # pairs cut as in training
    every = scored["r_chosen"].to_list() + scored["r_rejected"].to_list()
    mean = sum(every) / len(every)
    std = (sum((x - mean) ** 2 for x in every) / (len(every) - 1)) ** 0.5
    assert cal.n == 64 and cal.mean == pytest.approx(mean, abs=1e-3) and cal.std == pytest.approx(std, rel=1e-3)


def test_encoder_scores_match_plain_hf_text_pairs(tmp_path):
    """MiniLM sees [CLS] conversation [SEP] response [SEP] with segment ids 0/1, as a tokenizer text pair does,
    so a saved encoder RM scores the same in plain HF as in SynPref (batched, padded)."""
    from pipelines.rm.model import save_reward_model
    from pipelines.schema import prompt_text

    rm = load_reward_model(minilm_path())
    save_reward_model(rm, str(tmp_path / "m"))
    rows = synth_rows(12, seed=8)
    ours, _ = score_rows(load_reward_model(str(tmp_path / "m")), rows, "v", max_len=256)
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "m")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    by_id = {r["pair_id"]: r for r in ours.iter_rows(named=True)}
    for r in rows:
        with torch.no_grad():
            ref = hf(**tok(prompt_text(r["history"]), r["rejected"], return_tensors="pt")).logits[0, 0].item()
        assert by_id[r["pair_id"]]["r_rejected"] == pytest.approx(ref, abs=1e-5)


@pytest.mark.slow
def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path):
    rows = synth_rows(96, seed=6)
    cfg = TrainConfig(lr=5e-5, batch_size=16, max_len=64, eval_every=100, save_last_every=2, progress=False)

    class Crash(Exception):
        pass

    def crash_at_4(rec, step):
        if step == 4:
            raise Crash

    rm = load_reward_model(minilm_path())
    with pytest.raises(Crash):
        train_reward_model(rm, rows, rows[:16], cfg, str(tmp_path / "a"), log=crash_at_4)
    latest = json.loads((tmp_path / "a/checkpoints/latest").read_text())
    assert latest["step"] == 2 and (tmp_path / "a/checkpoints/step-2/trainer_state.pt").exists()
    resumed = train_reward_model(load_reward_model(minilm_path()), rows, rows[:16], cfg, str(tmp_path / "a"))
    assert resumed.resumed_from_step == 2 and resumed.steps == 6
    clean = train_reward_model(load_reward_model(minilm_path()), rows, rows[:16], cfg, str(tmp_path / "b"))
    a = load_reward_model(resumed.best_dir).model.state_dict()
    b = load_reward_model(clean.best_dir).model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_checkpoints_by_step_keep_last_k_a_finished_run_is_a_no_op_and_another_plan_is_refused(tiny_qwen, tmp_path,
                                                                                                 monkeypatch):
    """Step checkpoints are DCP folders behind an atomic `latest` pointer, only the newest `keep_last` kept; the
    best model is a sharded save exported once; the same run started again returns its result without training
    (no file touched, no log call); a checkpoint of another plan is refused with how to start fresh, untouched."""
    from pipelines.rm.calibration import CALIBRATION_FILE
    from pipelines.rm.train import CheckpointMismatch

    rows = synth_rows(60, seed=21)
    val = synth_rows(16, seed=22)
    cfg = TrainConfig(lr=1e-3, batch_size=8, max_steps=7, max_len=96, eval_every=2, save_last_every=1, keep_last=2,
                      progress=False, layout="shared_prefix")
    out = tmp_path / "run"
    seen: list[dict] = []
    from pipelines.rm.train import Checkpointer
    real_wait = Checkpointer.wait

    def wait_then_look(self):  # the moment save(5) has waited for save(4) and its commit (pointer + prune)
        real_wait(self)
        latest = _read_json(out / "checkpoints" / "latest")
        if latest is not None and latest.get("step") == 4 and not seen:
            ck = out / "checkpoints"
            seen.append({"latest": latest, "steps": sorted(p.name for p in ck.glob("step-*")),
                         "best": json.loads((ck / "best").read_text()),
                         "best_dirs": sorted(p.name for p in ck.glob("best-step-*")),
                         "metadata": (ck / "step-4" / ".metadata").exists(), "exported": (out / "best").exists()})

    monkeypatch.setattr(Checkpointer, "wait", wait_then_look)
    first = train_reward_model(load_reward_model(tiny_qwen), rows, val, cfg, str(out))
    monkeypatch.undo()
    s = seen[0]
    assert s["steps"] == ["step-3", "step-4"] and s["metadata"], s  # only the newest keep_last=2, whole DCP saves
    assert s["best_dirs"] == [s["best"]["dir"]] and not s["exported"]  # sharded best, no HF export yet
    assert first.steps == 7 and (out / "best" / "config.json").exists()
    assert json.loads((out / "checkpoints/latest").read_text())["finished"]
    assert not list((out / "checkpoints").glob("step-*"))  # a finished run keeps its exported model only
    # the exported model is the selected one: its gold_val accuracy is the best of the run's evaluations
    best_step = max((h for h in first.history if "val_accuracy" in h), key=lambda h: h["val_accuracy"])["step"]
    assert json.loads((out / "best" / CALIBRATION_FILE).read_text())["source"].endswith(f"step {best_step}")
    before = _tree(out)
    calls: list[int] = []
    again = train_reward_model(load_reward_model(tiny_qwen), rows, val, cfg, str(out), log=lambda r, s: calls.append(s))
    assert calls == [] and _tree(out) == before  # no training, no file written
    assert again.steps == first.steps and again.best_val_accuracy == first.best_val_accuracy
    assert again.history == first.history
    # another plan (other lr) in the same folder: refused, saying how to start fresh; nothing overwritten
    with pytest.raises(CheckpointMismatch, match=r"delete .*checkpoints"):
        train_reward_model(load_reward_model(tiny_qwen), rows, val, TrainConfig(**{**cfg.__dict__, "lr": 2e-3}),
                           str(out))
    assert _tree(out) == before
    # also mid-run: kill-free crash after step 3 leaves a checkpoint the other plan must not take over
    other = tmp_path / "other"

    class Crash(Exception):
        pass

    def crash(rec, step):
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        train_reward_model(load_reward_model(tiny_qwen), rows, val, cfg, str(other), log=crash)
    mid = _tree(other)
    with pytest.raises(CheckpointMismatch, match="another run"):
        train_reward_model(load_reward_model(tiny_qwen), rows, val, TrainConfig(**{**cfg.__dict__, "seed": 1}),
                           str(other))
    assert _tree(other) == mid
    resumed = train_reward_model(load_reward_model(tiny_qwen), rows, val, cfg, str(other))
    assert resumed.resumed_from_step == 2  # step 3's log raised before its save: step 2 is the newest


@pytest.mark.slow
def test_minilm_learns_real_hh_rlhf_pairs(lake, hh_path, tmp_path):
    from pipelines.ingest.run import ingest_shard

    ingest_shard(lake, hh_path, source="hh", shard="hh/test", run_id="r")
    rows = sorted(lake.read("raw_pairs").to_dicts(), key=lambda r: r["pair_id"])
    train, test = rows[:700], rows[-500:]
    rm = load_reward_model(minilm_path())
    cfg = TrainConfig(lr=5e-5, batch_size=16, max_len=128, eval_every=1000, progress=False)
    res = train_reward_model(rm, train, [], cfg, str(tmp_path / "hh"))
    scored, _ = score_rows(load_reward_model(res.best_dir), test, "hh", max_len=128)
    correct = int((scored["margin"] > 0).sum())
    lo, hi = wilson_interval(correct, scored.height)
    print(f"hh-rlhf held-out accuracy {correct / scored.height:.3f} (95% CI {lo:.3f}-{hi:.3f}, n={scored.height})")
    assert lo > 0.5, (correct, scored.height, lo)



@pytest.mark.slow
def test_fsdp_world_size_one_on_cpu_gloo(tiny_qwen, tmp_path):
    """The FSDP2 path (torchrun-style env, gloo, world size 1) trains and saves a loadable HF folder."""
    script = tmp_path / "fsdp_train.py"
    script.write_text(f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from pipelines.rm.model import load_reward_model
from pipelines.rm.train import TrainConfig, train_reward_model
from tests.rm_helpers import synth_rows
import torch.distributed as dist
rows = synth_rows(32, seed=7)
rm = load_reward_model({tiny_qwen!r})
res = train_reward_model(rm, rows, rows, TrainConfig(lr=2e-3, batch_size=8, epochs=6, max_len=96, eval_every=100,
                         progress=False), {str(tmp_path / 'out')!r})
print(json.dumps({{"fsdp": dist.is_initialized(), "acc": res.best_val_accuracy,
                  "loss0": res.history[0]["loss"], "loss1": res.history[-1]["loss"]}}))
dist.destroy_process_group()
""")
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["fsdp"] and res["loss1"] < res["loss0"] and res["acc"] > 0.8
    assert load_reward_model(str(tmp_path / "out" / "best")).model.config.num_labels == 1


@pytest.mark.slow
def test_margin_bt_trains_a_family_member_on_a_mix_where_some_pairs_state_no_margin(synpref_home):
    """The default mix has rows without a stated strength (Stage-1 verified pairs): margin_bt counts them as plain
    BT terms (margin 0), says how many in the metadata and lineage, and trains through the family asset."""
    import dagster as dg

    from assets.family import FAMILY_MEMBERS
    from definitions import defs
    from pipelines.curate.stage2 import CURATED_SCHEMA
    from pipelines.lake import Lake
    from pipelines.tables import CURATED, SEED

    lake = Lake(str(synpref_home / "lake"))
    rows = synth_rows(48, seed=21)
    curated = pl.DataFrame([{**{k: r[k] for k in ("pair_id", "history", "chosen", "rejected")},
                             "stage": "stage2" if i % 2 else "stage1", "work_unit": "u",
                             "margin": 1.5 if i % 2 else None} for i, r in enumerate(rows[:40])])
    curated = curated.select([(pl.col(c) if c in curated.columns else pl.lit(None)).cast(t).alias(c)
                              for c, t in CURATED_SCHEMA.items()])
    lake.overwrite(CURATED, curated.to_arrow())
    lake.overwrite(SEED, pl.DataFrame([{**{k: r[k] for k in ("pair_id", "history", "chosen", "rejected")},
                                        "split": "gold_val", "label_origin": "human", "label_flipped": False}
                                       for r in rows[40:]]).to_arrow())
    member = FAMILY_MEMBERS["tiny-qwen3"]
    with dg.instance_for_test() as inst:
        res = dg.materialize([member], instance=inst, resources=defs.resources, run_config={"ops": {
            member.node_def.name: {"config": {"loss": "margin_bt", "batch_size": 8}}}})
    assert res.success
    meta = res.asset_materializations_for_node(member.node_def.name)[0].metadata
    extra = json.loads(lake.read("rm_registry")["extra"][-1])
    assert meta["train_pairs"].value + extra["store_held_out"] + extra["store_refused"] == 40, extra
    lin = lake.lineage("rm_family")
    no_margin = json.loads(lin["counts"][-1])["pairs_without_margin"]
    assert 20 - (40 - meta["train_pairs"].value) <= no_margin <= 20  # one epoch: every stage-1 row, as plain BT
    import mlflow

    run = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(meta["mlflow_run_id"].value)
    assert run.data.params["train.loss"] == "margin_bt"


def _initial(path: str) -> dict:
    """The weights training starts from: the checkpoint's values in fp32 (the seeded head aside)."""
    return load_reward_model(path, dtype=torch.float32).model.state_dict()


def test_a_bf16_stored_backbone_trains_in_fp32_like_the_same_backbone_stored_in_fp32(tiny_qwen, tmp_path):
    """transformers loads a checkpoint in its stored dtype (bf16 for Qwen3/Llama hub weights); the optimizer's
    weights must be fp32 anyway, or AdamW steps of lr 3e-6 vanish (before: 3.3% of weights moved vs 90.7%).
    Through the trainer resource's in-process launcher (the default) and through train_reward_model handed a
    bf16 model; the export keeps full precision, bfloat16 on request."""
    from resources.trainer import TrainerResource
    from tests.rm_helpers import changed_fraction, stored_copy

    rows = synth_rows(32, seed=31)
    cfg = lambda **k: TrainConfig(lr=3e-6, batch_size=8, max_steps=4, warmup_ratio=0.0, max_len=128,  # noqa: E731
                                  progress=False, eval_every=100, **k)
    moved = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        path = stored_copy(tiny_qwen, tmp_path / name, dtype)
        res = TrainerResource(launcher="inprocess", device="cpu").train(path, rows, [], cfg(), str(tmp_path / f"o-{name}"))
        after = load_reward_model(res.best_dir).model.state_dict()
        assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())  # full-precision export
        moved[name] = changed_fraction(_initial(path), after)
    assert moved["fp32"] > 0.5 and abs(moved["bf16"] - moved["fp32"]) < 0.02, moved
    # a bf16 model handed to the trainer directly is trained in fp32 too; a bf16 export on request
    rm = load_reward_model(str(tmp_path / "bf16"))
    assert next(rm.model.parameters()).dtype == torch.bfloat16  # what transformers gives
    res = train_reward_model(rm, rows, [], cfg(export_dtype="bfloat16"), str(tmp_path / "direct"))
    assert all(p.dtype == torch.float32 for p in rm.model.parameters())
    out = load_reward_model(res.best_dir)
    assert next(out.model.parameters()).dtype == torch.bfloat16 and out.model.config.dtype == torch.bfloat16
    master = {k: v.to(torch.bfloat16) for k, v in rm.model.state_dict().items()}
    assert all(torch.equal(v, master[k]) for k, v in out.model.state_dict().items())
    with pytest.raises(ValueError, match="export_dtype"):
        train_reward_model(rm, rows, [], cfg(export_dtype="fp8"), str(tmp_path / "bad"))


def test_gradient_accumulation_gives_the_gradient_of_one_big_batch(tiny_qwen, tmp_path):
    """One SGD step (lr 1, no clipping: the update is the gradient) on a global batch of 16 pairs: cut by a token
    budget into several micro-batches, cut into fixed micro-batches of 3 pairs (a remainder of 1), or one
    forward of all 16 pairs: the same weights (the loss divides by the pairs of the global batch)."""
    rows = synth_rows(16, seed=32)
    base = dict(lr=1.0, optimizer="sgd", max_grad_norm=0.0, batch_size=16, max_steps=1, warmup_ratio=0.0,
                max_len=128, progress=False, eval_every=100, layout="shared_prefix")
    runs = {}
    for name, extra in (("one", {"micro_batch_tokens": 10**5}), ("tokens", {"micro_batch_tokens": 400}),
                        ("pairs", {"micro_batch_size": 3})):
        res = train_reward_model(load_reward_model(tiny_qwen), rows, [], TrainConfig(**base, **extra),
                                 str(tmp_path / name))
        runs[name] = (res, load_reward_model(res.best_dir).model.state_dict())
    assert runs["one"][0].history[0]["micro_steps"] == 1
    assert runs["tokens"][0].history[0]["micro_steps"] >= 3 and runs["pairs"][0].history[0]["micro_steps"] == 6
    init = load_reward_model(tiny_qwen).model.state_dict()
    ref = runs["one"][1]
    moved = max(float((ref[k] - init[k]).abs().max()) for k in ref)
    for name in ("tokens", "pairs"):
        worst = max(float((runs[name][1][k] - ref[k]).abs().max()) for k in ref)
        assert moved > 1e-3 and worst < 1e-5, (name, worst, moved)


def test_the_preflight_refuses_what_cannot_fit_and_names_the_setting(tiny_qwen, tmp_path):
    """Refused before the first step (nothing trained, nothing written), each with the setting to change."""
    from pipelines.rm.memory import GiB, MemoryPlanError, estimate
    from pipelines.rm.shards import InMemoryPairs
    from pipelines.rm.train import in_memory

    rows = synth_rows(16, seed=33)
    rm = load_reward_model(tiny_qwen)
    cfg = lambda **k: TrainConfig(batch_size=16, max_len=128, progress=False, layout="shared_prefix", **k)  # noqa: E731
    data, _ = in_memory(rm, rows, cfg())
    longest = int(data.row_lengths("shared_prefix").max())
    mem = estimate(rm.model, device=torch.device("cpu"), layout="shared_prefix", longest_row=longest, width=1,
                   world=1, sharded=False, compute_bytes=4, optimizer="adamw", grad_checkpointing=False,
                   attn_implementation="sdpa", limit=0)
    between = (mem.peak(longest, True) + mem.peak(longest, False)) / 2 / GiB  # fits only with checkpointing
    sixteen = mem.peak(16 * longest) / GiB
    cases = [({"micro_batch_tokens": 50_000_000}, "lower micro_batch_tokens"),
             ({"micro_batch_tokens": longest - 1}, "raise micro_batch_tokens"),
             ({"memory_limit_gb": between}, "set grad_checkpointing=true"),
             ({"memory_limit_gb": 0.1}, "more ranks"),
             ({"micro_batch_size": 16, "memory_limit_gb": sixteen * 0.99}, "lower micro_batch_size"),
             ({"grad_accum": 1, "memory_limit_gb": sixteen * 0.99}, "raise grad_accum")]
    for extra, says in cases:
        with pytest.raises(MemoryPlanError, match=says):
            train_reward_model(load_reward_model(tiny_qwen), InMemoryPairs(data.pairs), [], cfg(**extra),
                               str(tmp_path / "x"))
        assert not (tmp_path / "x" / "best").exists()
    # and with checkpointing on, the same limit trains
    res = train_reward_model(load_reward_model(tiny_qwen), InMemoryPairs(data.pairs), [],
                             cfg(memory_limit_gb=between, grad_checkpointing=True, max_steps=1), str(tmp_path / "ok"))
    assert res.steps == 1 and res.micro_batch_tokens >= longest and res.memory_estimate_gb <= between


def test_batches_pin_their_memory_for_asynchronous_copies():
    """DataLoader(pin_memory=True) pins a custom batch through its `pin_memory` method: every tensor pinned."""
    if not torch.cuda.is_available():
        pytest.skip("pinned host memory needs a CUDA device (none here)")
    from torch.utils.data._utils.pin_memory import pin_memory

    from pipelines.rm.collate import collate_shared_prefix
    from pipelines.rm.data import EncodedPair, Encoded

    b = collate_shared_prefix([EncodedPair("a", Encoded([1, 2, 3], 2), Encoded([1, 2, 4, 5], 2))], 0)
    pinned = pin_memory(b)
    assert all(t.is_pinned() for t in [*pinned.inputs.values(), pinned.mask, pinned.weight, pinned.reads,
                                       pinned.segment])


MEMORY_BOUND_PROBE = """
import json, resource, sys
sys.path.insert(0, {root!r})
import psutil, torch
from pipelines.rm.memory import GiB
from pipelines.rm.model import load_reward_model
from pipelines.rm.train import TrainConfig, train_reward_model
from tests.rm_helpers import synth_rows
rows = [{{**r, "history": [{{"role": "user", "content": r["history"][0]["content"] * 8}}]}} for r in synth_rows(48, seed=1)]
rm = load_reward_model(sys.argv[1])
base = psutil.Process().memory_info().rss
params = sum(p.numel() for p in rm.model.parameters())
res = train_reward_model(rm, rows, [], TrainConfig(batch_size=48, max_len=1024, micro_batch_tokens=4096, max_steps=1,
                         progress=False, layout="shared_prefix"), sys.argv[2])
# VmHWM, this address space's peak: ru_maxrss survives exec and starts at the RSS of the process that spawned us
# (a pytest process of 2 GB late in the suite made this probe "measure" 2 GB)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
# what the estimate adds to a process that already holds the loaded model and its libraries
est = res.memory_estimate_gb * GiB - GiB // 2 - 4 * params
print(json.dumps({{"measured": peak - base, "estimated": est, "micro": res.history[0]["micro_steps"]}}))
"""


@pytest.mark.slow
def test_the_memory_estimate_bounds_the_measured_peak_on_cpu(tmp_path):
    """Training one step of 48 pairs in micro-batches of 4,096 tokens (a 4-layer Qwen3 shape, fp32 on CPU): the
    peak the process reaches above its loaded model stays under the preflight's estimate, which is not more than
    twice it (an estimate that bounds nothing, or everything, would be no guide)."""
    backbone = build_tiny_decoder(tmp_path / "dec", "qwen3", hidden=256, layers=4)
    script = tmp_path / "probe.py"
    script.write_text(MEMORY_BOUND_PROBE.format(root=str(ROOT)))
    out = subprocess.run([sys.executable, str(script), backbone, str(tmp_path / "out")], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["micro"] > 1 and got["measured"] <= got["estimated"] <= 2 * got["measured"], got
