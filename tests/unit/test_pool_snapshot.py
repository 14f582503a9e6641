"""Anchor-pool snapshots on disk, in process (`AnchorPoolState` with put = get = identity; no Ray).

Save then load gives the very same pool: namespaces, anchor ids and metadata, part keys, tensor bytes and dtypes
(every codec dtype, bfloat16 included, and empty segments). A file that cannot be used is a warning and an empty
pool, never an exception. Loading into a smaller pool applies its bounds. The saver saves after N changes, after
T seconds, and on close.
"""
from __future__ import annotations

import logging
import random
import time

import msgpack
import pytest
import torch

from kvcomm.anchor_pool import AnchorPool
from kvcomm.codec import pack, pack_stream
from kvcomm.config import KVCommConfig
from kvcomm.kv import KVSegment

from actors.anchor_pool_actor import PoolSnapshotSettings, SnapshotSaver
from actors.pool_state import AnchorPoolState, transaction_payload

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]
LAYERS, KV_HEADS, HEAD_DIM = 3, 2, 16        # tiny-llama's KV shape


def _segment(g: torch.Generator, tokens: int, dtype: torch.dtype) -> KVSegment:
    def one() -> torch.Tensor:
        x = torch.randn(LAYERS, KV_HEADS, tokens, HEAD_DIM, generator=g)
        if dtype == torch.bool:
            return x > 0
        return x.to(dtype) if dtype.is_floating_point else (x * 20).to(dtype)
    return KVSegment(one(), one(), 0)


def filled_state(config: KVCommConfig, dtype: torch.dtype = torch.bfloat16, steps: int = 24,
                 seed: int = 0) -> AnchorPoolState:
    """A pool filled by real transactions (new anchors, deltas of several consumers, activations, empty
    following segments; reference mode, so rotated base keys are stored too) in two namespaces."""
    state = AnchorPoolState(config, put=lambda tensors: tensors)
    staging = AnchorPool(config)       # stages transactions (tensor math); the state is what is tested
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    bases: dict[str, KVSegment] = {}
    for _ in range(steps):
        namespace = rng.choice(["ns-a", "ns-b"])
        txn = staging.begin(namespace)
        wire = state.snapshot(namespace)
        known = [e["metadata"]["anchor_id"] for entries in wire["lists"].values() for e in entries]
        new = []
        for _ in range(rng.randint(0, 2)):
            base = _segment(g, rng.randint(1, 6), dtype)
            anchor_id = txn.add_anchor(rng.choice(["user_question", "agent_1_current"]), base)
            bases[anchor_id] = base
            new.append(anchor_id)
        for anchor_id in new + rng.sample(known, min(2, len(known))):
            base = bases[anchor_id]
            following = rng.choice([0, 0, 3])                  # empty following segments included
            txn.adopt_anchor(anchor_id, base.num_tokens)
            txn.add_deltas(anchor_id, rng.choice(["agent_1", "agent_2", "agent_3"]),
                           ph_real=_segment(g, base.num_tokens, dtype), ph_base_rotated=base,
                           pf_real=_segment(g, following, dtype), pf_base=_segment(g, following, dtype))
        if known:
            txn.activate(rng.sample(known, 1))
        if not txn.is_empty:
            state.commit(transaction_payload(txn))
        staging.abort(txn)
    return state


def dump(state: AnchorPoolState) -> dict:
    """Everything a client can see of the pool: per namespace, per placeholder, each anchor's metadata and its
    parts (key, dtype, bytes); plus the pool's version and byte counts."""
    stats = state.stats()
    out = {"version": stats["version"], "total_bytes": stats["total_bytes"], "namespaces": stats["namespaces"],
           "lists": {}}
    for namespace in stats["namespaces"]:
        wire = state.snapshot(namespace)
        for placeholder, entries in wire["lists"].items():
            for entry in entries:
                parts = entry["parts"]
                flat = {"base": parts["base"], **{f"deltas/{c}": p for c, p in parts["deltas"].items()},
                        **{f"rbk/{c}": p for c, p in parts["rbk"].items()}}
                out["lists"].setdefault((namespace, placeholder), []).append(
                    (entry["metadata"], {name: (p.key, p.dtype, p.nbytes,
                                                {k: (a.dtype.str, a.shape, a.tobytes()) for k, a in p.ref.items()})
                                         for name, p in flat.items()}))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_save_then_load_gives_the_same_pool_for_every_dtype(tmp_path, dtype) -> None:
    config = KVCommConfig(max_anchors=4, window=2, rerotate_deltas=False)
    state = filled_state(config, dtype, steps=12 if dtype != torch.bfloat16 else 30)
    before = dump(state)
    assert sum(len(v) for v in before["lists"].values()) >= 4
    if dtype == torch.bfloat16:       # the fuller pool: both namespaces, evictions, empty segments, rbk parts
        assert len(before["namespaces"]) == 2 and state.stats()["evictions"]["count"] > 0
        parts = [parts for entries in before["lists"].values() for _, parts in entries]
        shapes = [shape for by_name in parts for part in by_name.values() for _, shape, _ in part[3].values()]
        assert any(0 in shape for shape in shapes)                       # empty following segments
        assert any(name.startswith("rbk/") for by_name in parts for name in by_name)
    path = tmp_path / "pool.snapshot"
    info = state.save(path, tag="tiny")
    assert info["anchors"] == sum(len(v) for v in before["lists"].values()) and info["bytes"] == path.stat().st_size

    restored = AnchorPoolState(config, put=lambda tensors: tensors)
    loaded = restored.load(path, tag="tiny")
    assert loaded["loaded"] and loaded["anchors"] == info["anchors"] and loaded["version"] == before["version"]
    assert dump(restored) == before
    assert restored.epoch != state.epoch                      # a new epoch: clients rebuild their snapshots
    # the restored pool goes on like the original: the same commit gives the same result on both
    g = torch.Generator().manual_seed(99)
    staging = AnchorPool(config)
    txn = staging.begin("ns-a")
    txn.add_anchor("user_question", _segment(g, 2, dtype))
    payload = transaction_payload(txn)
    assert state.commit(payload) == restored.commit(payload)
    assert state.stats()["namespaces"] == restored.stats()["namespaces"]


def test_a_snapshot_is_an_ordinary_codec_payload(tmp_path) -> None:
    from kvcomm.codec import unpack
    state = filled_state(KVCommConfig(rerotate_deltas=False), torch.bfloat16, steps=6)
    path = tmp_path / "pool.snapshot"
    state.save(path)
    body = unpack(path.read_bytes())
    assert body["kind"] == "kvcomm-anchor-pool" and body["schema"] == 1
    assert len(body["anchors"]) == len(state._base_parts)
    first = body["anchors"][0]["parts"]["base"]["tensors"]["base_keys"]
    assert first.dtype == torch.bfloat16 and first.shape[:2] == (LAYERS, KV_HEADS)


def _bad_files(good: bytes) -> dict[str, bytes]:
    envelope = msgpack.unpackb(good, raw=False, strict_map_key=False)
    other_schema = dict(envelope, body={**envelope["body"], "schema": 99})
    other_kind = dict(envelope, body={**envelope["body"], "kind": "something-else"})
    missing_part = dict(envelope, body={**envelope["body"], "anchors": [
        {**a, "parts": {**a["parts"], "base": {**a["parts"]["base"], "tensors": {}}}}
        for a in envelope["body"]["anchors"]]})
    fewer = dict(envelope, body={**envelope["body"], "anchors": envelope["body"]["anchors"][:-1]})
    return {
        "truncated": good[: len(good) // 2],
        "garbage": b"\x00\xffnot a snapshot at all" * 10,
        "empty": b"",
        "codec version": msgpack.packb(dict(envelope, version=99), use_bin_type=True),
        "schema version": msgpack.packb(other_schema, use_bin_type=True),
        "kind": msgpack.packb(other_kind, use_bin_type=True),
        "missing tensors": msgpack.packb(missing_part, use_bin_type=True),
        "plain tensor": pack(torch.ones(3)),
        "count mismatch": _with_count(fewer, len(envelope["body"]["anchors"])),
    }


def _with_count(envelope: dict, announced: int) -> bytes:
    """A payload whose anchors list announces `announced` items but holds fewer (as a cut-off write would)."""
    import io
    out = io.BytesIO()
    body = envelope["body"]
    packer = msgpack.Packer(use_bin_type=True)
    out.write(packer.pack_map_header(3) + packer.pack("magic") + packer.pack(envelope["magic"])
              + packer.pack("version") + packer.pack(envelope["version"]) + packer.pack("body")
              + packer.pack_map_header(len(body)))
    for key, value in body.items():
        if key == "anchors":
            out.write(packer.pack(key) + packer.pack_array_header(announced))
            for item in value:
                out.write(packer.pack(item))
        else:
            out.write(packer.pack(key) + packer.pack(value))
    return out.getvalue()


def test_unusable_snapshots_warn_and_leave_an_empty_working_pool(tmp_path, caplog) -> None:
    config = KVCommConfig(rerotate_deltas=False)
    state = filled_state(config, torch.bfloat16, steps=8)
    good_path = tmp_path / "good.snapshot"
    state.save(good_path, tag="tiny")
    good = good_path.read_bytes()
    cases = _bad_files(good)
    cases["other tag"] = good
    for name, data in cases.items():
        path = tmp_path / f"{name.replace(' ', '-')}.snapshot"
        path.write_bytes(data)
        fresh = AnchorPoolState(config, put=lambda tensors: tensors)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="actors.pool_state"):
            info = fresh.load(path, tag="tiny" if name != "other tag" else "another-model")
        assert info["loaded"] is False, name
        assert any("unusable" in r.message and "empty pool" in r.message for r in caplog.records), name
        assert fresh.stats()["total_bytes"] == 0 and fresh.version == 0 and not fresh._base_parts, name
        assert not path.exists() and (tmp_path / (path.name + ".rejected")).read_bytes() == data, name
        g = torch.Generator().manual_seed(1)                   # and the pool works
        staging = AnchorPool(config)
        txn = staging.begin("ns")
        txn.add_anchor("user_question", _segment(g, 2, torch.float32))
        assert fresh.commit(transaction_payload(txn)) == 1, name
    missing = AnchorPoolState(config, put=lambda tensors: tensors)
    assert missing.load(tmp_path / "never-saved.snapshot") == {"loaded": False, "reason": "no snapshot file"}


def test_loading_into_a_smaller_pool_applies_its_bounds(tmp_path) -> None:
    state = filled_state(KVCommConfig(max_anchors=6, window=3, rerotate_deltas=False), torch.float32, steps=30)
    path = tmp_path / "pool.snapshot"
    state.save(path)
    big = state.stats()
    budget = big["total_bytes"] // 2
    small = AnchorPoolState(KVCommConfig(max_anchors=2, window=2, pool_byte_budget=budget, rerotate_deltas=False),
                            put=lambda tensors: tensors)
    assert small.load(path)["loaded"]
    stats = small.stats()
    assert 0 < stats["total_bytes"] <= budget
    assert all(v["anchors"] <= 2 for lists in stats["namespaces"].values() for v in lists.values())
    assert stats["parts"]["base"] == sum(v["anchors"] for lists in stats["namespaces"].values() for v in lists.values())


def test_saver_saves_after_n_changes_after_t_seconds_and_on_close(tmp_path) -> None:
    config = KVCommConfig(rerotate_deltas=False)
    path = tmp_path / "pool.snapshot"
    state = AnchorPoolState(config, put=lambda tensors: tensors)
    g = torch.Generator().manual_seed(3)

    def commit(target: AnchorPoolState) -> None:
        txn = AnchorPool(config).begin("ns")
        txn.add_anchor("user_question", _segment(g, 2, torch.float32))
        target.commit(transaction_payload(txn))

    saver = SnapshotSaver(state, PoolSnapshotSettings(str(path), every_commits=3, every_s=3600))
    assert saver.loaded == {"loaded": False, "reason": "no snapshot file"}
    for _ in range(2):
        commit(state)
        saver.note_change()
    time.sleep(0.3)
    assert saver.saves == 0 and not path.exists()              # 2 changes < every_commits
    commit(state)
    saver.note_change()
    deadline = time.monotonic() + 10
    while saver.saves < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert saver.saves == 1 and saver.last_save["version"] == 3 and saver.last_save["anchors"] == 3
    commit(state)
    saver.note_change()
    assert saver.close()["version"] == 4                       # the unsaved change, on close
    assert saver.close() is None                               # nothing left

    timed_state = AnchorPoolState(config, put=lambda tensors: tensors)
    timed = SnapshotSaver(timed_state, PoolSnapshotSettings(str(path), every_commits=1000, every_s=0.2))
    assert timed.loaded["loaded"] and timed_state.version == 4 and timed.saves == 0   # loaded, nothing to save
    commit(timed_state)
    timed.note_change()
    deadline = time.monotonic() + 10
    while timed.saves < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert timed.saves == 1 and timed.last_save["version"] == 5
    timed.close()


def test_pack_stream_writes_an_ordinary_payload_and_checks_its_count(tmp_path) -> None:
    from kvcomm.codec import CodecError, unpack, unpack_stream
    items = [{"i": i, "t": torch.full((2, i), float(i), dtype=torch.bfloat16)} for i in range(4)]
    path = tmp_path / "stream.bin"
    with open(path, "wb") as file:
        written = pack_stream(file, {"name": "x", "empty": torch.empty(0, 3)}, iter(items), count=4)
    assert written == path.stat().st_size
    whole = unpack(path.read_bytes())
    assert whole["name"] == "x" and whole["empty"].shape == (0, 3) and len(whole["items"]) == 4
    with open(path, "rb") as file:
        head, count, stream = unpack_stream(file)
        got = list(stream)
    assert head["name"] == "x" and count == 4
    assert all(torch.equal(a["t"], b["t"]) and a["t"].dtype == torch.bfloat16 for a, b in zip(got, items))
    with open(tmp_path / "short.bin", "wb") as file, pytest.raises(CodecError, match="3 items written, 4"):
        pack_stream(file, {}, iter(items[:3]), count=4)
    path.write_bytes(path.read_bytes()[:-5])
    with open(path, "rb") as file, pytest.raises(CodecError, match="not a complete"):
        list(unpack_stream(file)[2])
