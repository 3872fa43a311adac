"""Resume a Trainer run from crafted, re-signed checkpoints, many cases in one process.

usage: python fuzz_trainer.py BASE WORK MODEL_DIR CASES_JSON

BASE holds a run of hf_user_train.py (checkpoint-2 and checkpoint-4, 4 steps). For each
case of CASES_JSON (``[{"name": ..., "seed": ..., "explicit": bool}, ...]``): copy BASE,
apply the mutation to checkpoint-4 (``mutate``), re-sign its manifest as an attacker
can, then train to step 6 with a fresh SFTTrainer + SafepointCallback, resuming
automatically (or from checkpoint-4 when ``explicit``). One JSON line per case on stdout:
the checkpoint resumed from, what the run record says was skipped, the error line of an
explicit resume, a digest of the final weights. Any other exception escapes: the test
sees a traceback and fails.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from tests.hostile.helpers import body, sign

# ------------------------------------------------------------------ raw safetensors


def st_read(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def st_write(path: Path, header: dict[str, Any], data: bytes) -> None:
    blob = json.dumps(header).encode()
    blob += b" " * (-(8 + len(blob)) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
         "U8": 1, "BOOL": 1}  # fmt: skip


def _moments(header: dict[str, Any]) -> list[str]:
    return sorted(k for k in header if k != "__metadata__" and not k.endswith(".step"))


def _retile(header: dict[str, Any], data: bytes, name: str, new: bytes) -> tuple[dict, bytes]:
    """Replace the bytes of ``name`` with ``new``, moving every later tensor."""
    begin, end = header[name]["data_offsets"]
    delta = len(new) - (end - begin)
    for k, e in header.items():
        if k != "__metadata__" and e["data_offsets"][0] >= end and k != name:
            e["data_offsets"] = [e["data_offsets"][0] + delta, e["data_offsets"][1] + delta]
    header[name]["data_offsets"] = [begin, begin + len(new)]
    return header, data[:begin] + new + data[end:]


def mutate_tensors(ck: Path, rng: random.Random, file: str = "optimizer.safetensors") -> str:
    """A shape, dtype or element count that lies about a state tensor (or a hostile
    header); the bytes stay a well-formed file unless the case is about that."""
    header, data = st_read(ck / file)
    names = (
        _moments(header) if file.startswith("optimizer") else sorted(set(header) - {"__metadata__"})
    )
    name = rng.choice(names)
    e = header[name]
    shape, size = e["shape"], SIZES[e["dtype"]]
    numel = (e["data_offsets"][1] - e["data_offsets"][0]) // size
    kind = rng.choice(["few", "transpose", "flat", "extra_dim", "relabel", "halve", "widen",
                       "huge_zero", "overflow_zero", "drop", "step_shape",
                       "step_dtype"])  # fmt: skip
    if kind == "few":  # 2 elements for a parameter of many (the heap corruption)
        k = rng.choice([1, 2, numel // 2, numel - 1])
        e["shape"] = [k]
        header, data = _retile(header, data, name, data[e["data_offsets"][0] :][: k * size])
    elif kind == "transpose" and len(shape) == 2 and shape[0] != shape[1]:
        e["shape"] = shape[::-1]
    elif kind == "flat" and len(shape) > 1:
        e["shape"] = [numel]
    elif kind == "extra_dim":
        e["shape"] = [*shape, 1] if rng.random() < 0.5 else [1, *shape]
    elif kind == "relabel":  # the same bytes read as another dtype of the same size
        e["dtype"] = rng.choice([d for d, s in SIZES.items() if s == size and d != e["dtype"]
                                 and d != "BOOL"] or ["I32"])  # fmt: skip
        if SIZES[e["dtype"]] != size:
            return mutate_tensors(ck, rng, file)
    elif kind == "halve":  # F32 bytes as twice as many 2-byte values
        e["dtype"] = rng.choice(["F16", "BF16", "I16"])
        e["shape"] = [*shape[:-1], shape[-1] * size // 2] if shape else [size // 2]
    elif kind == "widen" and numel % 2 == 0:
        e["dtype"] = rng.choice(["F64", "I64"])
        e["shape"] = [numel * size // 8]
    elif kind == "huge_zero":
        header[f"{name}.zz"] = {"dtype": "F32", "shape": [2**63 + 5, 0], "data_offsets": [0, 0]}
    elif kind == "overflow_zero":
        e2 = {"dtype": "F32", "shape": [2**62, 2**62, 0], "data_offsets": [0, 0]}
        header[f"{name}.zz"] = e2
    elif kind == "drop":
        header, data = _retile(header, data, name, b"")
        del header[name]
    elif kind in ("step_shape", "step_dtype") and file.startswith("optimizer"):
        step = rng.choice([k for k in header if k.endswith(".step")])
        if kind == "step_shape":  # a step of 2 elements
            old = header[step]
            header, data = _retile(header, data, step, data[old["data_offsets"][0] :][:4] * 2)
            header[step]["shape"] = [2]
        else:
            header[step]["dtype"] = "I32"
            header[step]["shape"] = []
            header, data = _retile(header, data, step, struct.pack("<i", -5))
    else:
        return mutate_tensors(ck, rng, file)
    st_write(ck / file, header, data)
    return f"{file}:{name}:{kind}"


def _opt(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["entries"]["optimizer"]["tree"]


def _pairs(doc: dict[str, Any]) -> list[list[Any]]:
    return _opt(doc)["state"]["__dict__"]


BAD_VALUES = ["x", None, True, [1], {"__float__": "nan"}, {"__tensor__": "nope"}, -1, 1.5,
              {"__tuple__": [0.9]}, {"__dict__": [1, 2]}, {"__ndarray__": "O", "data": "x"},
              2**62, {"__bytes__": "!!"}, {"__dtype__": "nothing"}, []]  # fmt: skip


def mutate_state(ck: Path, rng: random.Random) -> str:
    """An optimizer, scheduler, progress or RNG entry of state.json changed in kind,
    id, count or value type."""
    doc = json.loads((ck / "state.json").read_bytes())
    groups = _opt(doc)["param_groups"]
    sched = doc["entries"]["scheduler"]["tree"]
    pairs = _pairs(doc)
    bad = rng.choice(BAD_VALUES)
    kind = rng.choice(["pid", "params", "groups", "hyper", "hyper_missing", "hyper_extra",
                       "state_value", "state_missing", "state_type", "step", "ndarray",
                       "sched", "sched_len", "sched_extra", "lambdas", "rng", "entry"])  # fmt: skip
    where = kind
    if kind == "pid":
        pair = rng.choice(pairs)
        pair[0] = rng.choice([99, -1, True, "0", None, [0], pairs[-1][0] if pair is not pairs[-1]
                              else pairs[0][0]])  # fmt: skip
    elif kind == "params":
        ids = groups[0]["params"]
        choice = rng.choice(["drop", "dup", "unknown", "bool", "str"])
        if choice == "drop":
            ids.pop()
        elif choice == "dup":
            ids[-1] = ids[0]
        else:
            ids[-1] = {"unknown": 99, "bool": True, "str": "1"}[choice]
        where = f"params:{choice}"
    elif kind == "groups":
        if rng.random() < 0.5:
            groups.pop()
        else:
            groups.append(copy.deepcopy(groups[-1]))
    elif kind == "hyper":
        key = rng.choice(["lr", "betas", "eps", "weight_decay", "amsgrad", "fused", "maximize",
                          "initial_lr", "foreach", "capturable"])  # fmt: skip
        value = bad
        if key in ("amsgrad", "fused", "maximize", "foreach", "capturable") and bad is True:
            value = "x"  # a flag flipped to another bool may fit; a non-bool never does
            if key == "amsgrad":
                value = True  # amsgrad on, with no max_exp_avg_sq: refused
        if key in ("lr", "eps", "weight_decay", "initial_lr") and bad in (-1, 1.5, 2**62):
            value = "x"  # another number fits
        groups[0][key] = value
        where = f"hyper:{key}={value!r}"
    elif kind == "hyper_missing":
        key = rng.choice(["lr", "betas", "eps", "weight_decay"])
        del groups[0][key]
        where = f"hyper_missing:{key}"
    elif kind == "hyper_extra":
        groups[0]["zz"] = [1, 2]
    elif kind in ("state_value", "state_type", "ndarray"):
        st = rng.choice(pairs)[1]
        key = rng.choice(["exp_avg", "exp_avg_sq"])
        if kind == "ndarray":
            st[key] = {"__ndarray__": rng.choice(["zzz", "O", "V8", "<f8", "|b1", ">i4", "<c16"]),
                       "data": st[key]["__tensor__"]}  # fmt: skip
        elif kind == "state_type":
            pick = rng.choice(pairs)
            pick[1] = rng.choice([[1, 2], "x", 3, None])
            key = "whole"
        else:
            # Another state tensor of another shape (one of the same shape is consistent
            # data, loaded as data: the threat model's re-signed values), or none.
            shapes = {k: v["shape"] for k, v in st_read(ck / "optimizer.safetensors")[0].items()
                      if k != "__metadata__"}  # fmt: skip
            mine = shapes.get(st[key]["__tensor__"]) if isinstance(st[key], dict) else None
            others = [n for n, shape in shapes.items() if shape != mine] + ["missing"]
            st[key] = rng.choice([bad, {"__tensor__": rng.choice(others)}])
        where = f"{kind}:{key}"
    elif kind == "state_missing":
        st = rng.choice(pairs)[1]
        del st[rng.choice(["exp_avg", "exp_avg_sq"])]
    elif kind == "step":
        st = rng.choice(pairs)[1]
        st["step"] = rng.choice(["x", -1, {"__float__": "nan"}, {"__float__": "inf"}, [1],
                                 {"__tensor__": next(iter(st.values()))["__tensor__"]
                                  if False else pairs[0][1]["exp_avg"]["__tensor__"]}])  # fmt: skip
        where = f"step={st['step']!r}"
    elif kind == "sched":
        key = rng.choice(["last_epoch", "_step_count", "_is_initial",
                          "_get_lr_called_within_step", "_last_lr", "base_lrs"])  # fmt: skip
        value = rng.choice(["x", 1.5, None, {"__float__": "nan"}, [1], {"a": 1}, -7, 2**62])
        if key in ("last_epoch", "_step_count") and value in (-7, 2**62) and key == "_step_count":
            value = "x"
        if key in ("_last_lr", "base_lrs") and value in (1.5, -7, 2**62):
            value = [value]  # a list of one: not one per parameter group
        sched[key] = value
        where = f"sched:{key}={value!r}"
    elif kind == "sched_len":
        key = rng.choice(["_last_lr", "base_lrs"])
        sched[key] = sched[key][:1] if rng.random() < 0.5 else [*sched[key], 0.1]
        where = f"sched_len:{key}"
    elif kind == "sched_extra":
        sched[rng.choice(["zz", "optimizer", "__dict__", "lr_lambda"])] = 1
    elif kind == "lambdas":
        sched["lr_lambdas"] = rng.choice([[], [{"zz": 1}, {}], ["x", None], "x", [None]])
        where = f"lambdas={sched['lr_lambdas']!r}"
    elif kind == "rng":
        rngdoc = doc["rng"]
        part = rng.choice(["torch", "numpy", "python"])
        rngdoc[part] = rng.choice(["x", None, [1, 2], {"keys": [1]}])
        where = f"rng:{part}"
    elif kind == "entry":
        entries = doc["entries"]
        choice = rng.choice(["kind", "drop_sched", "file", "tree_list"])
        if choice == "kind":
            entries["optimizer"]["kind"] = "value"
        elif choice == "drop_sched":
            del entries["scheduler"]
        elif choice == "file":
            entries["optimizer"]["file"] = "adapter_model.safetensors"
        else:
            entries["optimizer"]["tree"] = [1, 2, 3]
        where = f"entry:{choice}"
    (ck / "state.json").write_text(json.dumps(doc))
    return f"state.json:{where}"


def _huge_zero(ck: Path, file: str) -> None:
    header, data = st_read(ck / file)
    header["zz"] = {"dtype": "F32", "shape": [2**63 + 5, 0], "data_offsets": [0, 0]}
    st_write(ck / file, header, data)


def _edit_state(ck: Path, change: Any) -> None:
    doc = json.loads((ck / "state.json").read_bytes())
    change(doc)
    (ck / "state.json").write_text(json.dumps(doc))


def _few(ck: Path, dtype: str | None) -> None:
    header, data = st_read(ck / "optimizer.safetensors")
    name = _moments(header)[0]
    if dtype:  # the same bytes, labelled another dtype
        header[name]["dtype"] = dtype
    else:  # 2 elements for a parameter of many
        header[name]["shape"] = [2]
        start = header[name]["data_offsets"][0]
        header, data = _retile(header, data, name, data[start : start + 8])
    st_write(ck / "optimizer.safetensors", header, data)


# The reproductions, by name.
FIXED = {
    "few": lambda ck: _few(ck, None),
    "i32": lambda ck: _few(ck, "I32"),
    "huge_opt": lambda ck: _huge_zero(ck, "optimizer.safetensors"),
    "huge_adapter": lambda ck: _huge_zero(ck, "adapter_model.safetensors"),
    "last_epoch": lambda ck: _edit_state(
        ck, lambda d: d["entries"]["scheduler"]["tree"].update(last_epoch="x")
    ),
    "ids": lambda ck: _edit_state(ck, lambda d: _pairs(d)[0].__setitem__(0, 99)),
    "ndarray": lambda ck: _edit_state(
        ck, lambda d: _pairs(d)[0][1].update(exp_avg={"__ndarray__": "zzz", "data": "x"})
    ),
}


def mutate(ck: Path, seed: int | str) -> str:
    if isinstance(seed, str):
        FIXED[seed](ck)
        sign(ck, body(ck))
        return seed
    rng = random.Random(seed)
    roll = rng.random()
    if roll < 0.35:
        what = mutate_tensors(ck, rng)
    elif roll < 0.4:
        what = mutate_tensors(ck, rng, "adapter_model.safetensors")
    else:
        what = mutate_state(ck, rng)
    sign(ck, body(ck))
    return what


# ------------------------------------------------------------------ the runs


def digest(model: Any) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().view(-1).view(__import__("torch").uint8).numpy())
    return h.hexdigest()[:16]


def main(argv: list[str]) -> int:
    base, work, model_dir, cases_file = map(Path, argv)
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from safepoint import SafepointCallback
    from safepoint.app.tiny import builtin_dataset_path
    from safepoint.errors import SafepointError

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = load_dataset("json", data_files=str(builtin_dataset_path()), split="train")
    said: list[str] = []

    class Said(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    logging.getLogger("safepoint").addHandler(Said(logging.WARNING))
    logging.getLogger("safepoint").setLevel(logging.INFO)
    for case in json.loads(cases_file.read_text()):
        out = work / case["name"]
        shutil.copytree(base, out, symlinks=True)
        (out / "safepoint.lock").unlink(missing_ok=True)
        what = "none"
        if case.get("drop") or case.get("drop_all"):  # the references
            shutil.rmtree(out / "checkpoint-4")
            if case.get("drop_all"):
                shutil.rmtree(out / "checkpoint-2")
        elif case.get("both"):  # both rejected only once the optimizer exists
            for ck in ("checkpoint-2", "checkpoint-4"):
                what = mutate(out / ck, "huge_opt")
        elif case.get("seed") is not None:
            what = mutate(out / "checkpoint-4", case["seed"])
        said.clear()
        config = SFTConfig(
            output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
            logging_steps=2, max_length=64, report_to="none", disable_tqdm=True, use_cpu=True,
            dataloader_num_workers=0, lr_scheduler_type="linear", warmup_steps=2,
            num_train_epochs=100,
        )  # fmt: skip
        callback = SafepointCallback(save_every="2", keep_last=2, async_save=False)
        trainer = SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(model_dir),
            args=config,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1),
            callbacks=[callback],
        )
        result: dict[str, Any] = {"name": case["name"], "mutation": what}
        try:
            explicit = str(out / "checkpoint-4") if case.get("explicit") else None
            trainer.train(resume_from_checkpoint=explicit)
            result["resumed"] = callback.resumed_from and callback.resumed_from.name
            result["digest"] = digest(trainer.model)
            result["step"] = trainer.state.global_step
        except SafepointError as e:
            result["error"] = str(e)
            result["exit_code"] = e.exit_code
        events = [
            json.loads(line) for line in (out / "safepoint.log.jsonl").read_text().splitlines()
        ]
        resumes = [e for e in events if e.get("event") == "resume"]
        result["skipped"] = resumes[-1].get("skipped") if resumes else None
        result["warnings"] = [m for m in said if "skipping" in m]
        print(json.dumps(result), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
