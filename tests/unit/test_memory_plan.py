"""The memory plan: exact sizes against the real runner, the plan's arithmetic and its refusals, `kvcomm plan` on
the 8 x H100 example, a decoding sequence's KV held once, decode buffers that never outgrow the KV budget, and a
scheduler that admits turns by KV bytes (and fails, naming the limit, those that can never fit)."""
from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest
import torch
import yaml

from actors.scheduler import TurnScheduler
from cluster.cli import main as cli_main
from kvcomm.config import KVCommConfig
from kvcomm.engine import ContextLengthError, KVCommEngine, TurnRequest
from kvcomm.generation import DecodeBatch, Sampling, generate_from_ids
from kvcomm.memory_plan import (GIB, JobShape, KVBudget, KVBudgetError, MemoryConfig, MemoryPlanError,
                                capacity_class, model_weight_bytes, plan_memory)
from kvcomm.model_loading import load_model
from kvcomm.model_spec import PRESETS
from kvcomm.runner import ModelRunner
from kvcomm.engine import build_engine
from kvcomm.templates import AgentTemplate

REPO = Path(__file__).resolve().parents[2]
H100_CONFIG = REPO / "configs" / "h100x8-llama3.1-8b.yaml"


@pytest.fixture(scope="module")
def tiny():
    loaded = load_model("tiny-llama", random_weights=True, seed=21, embedded_tokenizer=False)
    return loaded, ModelRunner(loaded.spec, loaded.state_dict)


def _ids(n: int, seed: int, vocab: int = 512) -> torch.Tensor:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------------
# sizes and the plan
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])   # untied, no bias / tied, q/k/v bias
def test_weight_and_kv_sizes_are_those_of_the_real_runner(preset):
    loaded = load_model(preset, random_weights=True, dtype="bfloat16", embedded_tokenizer=False)
    runner = ModelRunner(loaded.spec, loaded.state_dict)
    assert model_weight_bytes(loaded.spec, torch.bfloat16) == runner.weight_bytes
    _, kv = runner.prefill(_ids(10, 0), extra_capacity=22)
    assert runner.kv_bytes_per_token == kv.nbytes // kv.capacity


def test_the_plan_adds_up_and_names_the_knob_when_it_cannot_fit():
    spec = PRESETS["llama-3.1-8b"]
    config = MemoryConfig(device_memory_bytes=80 * GIB)
    plan = plan_memory(spec, torch.bfloat16, config, device_type="cuda", anchor_cache_bytes=8 * GIB,
                       content_cache_bytes=GIB, max_batch_size=32)
    assert plan.usable_bytes == int(80 * GIB * 0.9)
    assert plan.kv_bytes == (plan.usable_bytes - plan.weights_bytes - 8 * GIB - GIB - config.agent_cache_bytes
                             - plan.scratch_bytes - plan.prepare_bytes)
    assert plan.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 and plan.kv_tokens == plan.kv_bytes // (128 << 10)
    assert 14.9 < plan.weights_bytes / GIB < 15.0                      # 8.03 B parameters in bf16
    jobs = plan.jobs(JobShape())
    assert jobs["turn_bytes"] == capacity_class(JobShape().longest_turn_tokens) * plan.kv_bytes_per_token
    assert jobs["jobs_decoding"] == min(32, plan.kv_bytes // jobs["turn_bytes"])

    with pytest.raises(MemoryPlanError, match="memory.device_memory_bytes"):     # weights alone do not fit
        plan_memory(spec, torch.bfloat16, MemoryConfig(device_memory_bytes=16 * GIB), device_type="cuda")
    with pytest.raises(MemoryPlanError, match=r"anchor_cache_bytes \(52.00 GiB\)"):   # the biggest item named
        plan_memory(spec, torch.bfloat16, config, device_type="cuda", anchor_cache_bytes=52 * GIB)
    with pytest.raises(MemoryPlanError, match="memory.max_prompt_tokens"):
        plan_memory(spec, torch.bfloat16, MemoryConfig(device_memory_bytes=80 * GIB, max_prompt_tokens=131072),
                    device_type="cuda")
    with pytest.raises(MemoryPlanError, match="set memory.device_memory_bytes"):   # no figure, no GPU to measure
        plan_memory(spec, torch.bfloat16, MemoryConfig(), device_type="cuda")

    with pytest.raises(KVBudgetError, match="memory.max_prompt_tokens = 8192") as err:
        plan.check_request(9000, 10)
    assert err.value.too_long == "prompt"                  # what the client must shorten: its messages
    small = dataclasses.replace(plan, kv_bytes=1000 * plan.kv_bytes_per_token)
    with pytest.raises(KVBudgetError, match="KV budget is 1000 tokens") as err:
        small.check_request(500, 600)
    assert err.value.too_long == "output"                  # the prompt fits; its output budget does not
    with pytest.raises(KVBudgetError, match="KV budget is 1000 tokens") as err:
        small.check_request(900, 200)                      # its slot's size class (1024) is over it even alone
    assert err.value.too_long == "prompt"
    small.check_request(700, 20)


def test_the_h100_example_passes_its_own_plan(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert cli_main(["plan", "--config", str(H100_CONFIG), "--architecture", "llama-3.1-8b",
                     "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "KV tokens that fit" in printed and "anchor bytes per question" in printed
    (report,) = json.loads(out.read_text())
    cluster = yaml.safe_load(H100_CONFIG.read_text())["applications"][0]["args"]["cluster"]
    plan, jobs = report["plan"], report["jobs"]
    assert report["replicas"] == cluster["num_workers"] == 8 and plan["dtype"] == "bfloat16"
    assert plan["anchor_cache_bytes"] == cluster["anchor_cache_bytes"]
    # the config's batch of Table-2-shaped turns fits the KV the plan leaves
    assert jobs["jobs_by_kv"] >= cluster["max_batch_size"] == jobs["jobs_decoding"]
    assert plan["kv_tokens"] * plan["kv_bytes_per_token"] <= plan["kv_bytes"] < plan["usable_bytes"]


def test_kvcomm_plan_refuses_a_config_that_cannot_fit(tmp_path, capsys):
    data = yaml.safe_load(H100_CONFIG.read_text())
    cluster = data["applications"][0]["args"]["cluster"]
    cluster["memory"]["device_memory_bytes"] = 24 * GIB             # an L4-sized card
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli_main(["plan", "--config", str(path), "--architecture", "llama-3.1-8b"]) == 2
    error = capsys.readouterr().err
    assert "anchor_cache_bytes (8.00 GiB)" in error and "memory.device_memory_bytes" in error
    assert cli_main(["plan", "--config", str(H100_CONFIG)]) == 2       # the checkpoint is not on this machine
    assert "--architecture" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# decode buffers
# ------------------------------------------------------------------------------------------------------------
def test_a_decoding_sequence_holds_its_kv_once(tiny):
    loaded, runner = tiny
    budget = runner.kv_budget = KVBudget(10 * 64 * runner.kv_bytes_per_token)
    try:
        logits, kv = runner.prefill(_ids(30, 1), extra_capacity=100)   # a prefill that reserved room anyway
        batch = DecodeBatch(runner)
        state = batch.add(kv, logits[-1], Sampling(max_new_tokens=20, min_new_tokens=20))
        slot = capacity_class(30 + 20) * runner.kv_bytes_per_token
        assert kv.capacity == 0 and kv.nbytes == 0                    # moved into the slot, its storage freed
        assert budget.used == batch.kv_bytes == slot
        for _ in range(5):
            batch.step()
        assert budget.used == slot and kv.capacity == 0
        batch.active = ()
        assert budget.used == 0 and batch.kv_bytes == 0
        assert kv.length == kv.capacity == 30 + 5                     # back, in storage of exactly its tokens
        alone = generate_from_ids(runner, _ids(30, 1), Sampling(max_new_tokens=6, min_new_tokens=6))
        assert torch.equal(kv.segment().keys, alone.kv.segment(0, 35).keys)
    finally:
        runner.kv_budget = KVBudget(None)


@pytest.mark.parametrize("room_tokens", [64 * 3 + 128 * 2, 64 + 128 * 2])
def test_a_burst_over_two_classes_never_exceeds_the_budget(tiny, room_tokens):
    """Five sequences, two capacity classes (3 x 64 and 2 x 128 tokens): with room for exactly their five slots
    all decode at once in several buffers (merging them would need room for both copies); with less, those that
    do not fit wait and join as slots free. Either way the ledger never passes its capacity and every sequence
    decodes as it would alone."""
    loaded, runner = tiny
    lengths, budgets = [10, 20, 30, 60, 70], [8, 12, 6, 40, 30]
    per_slot = [capacity_class(n + m) for n, m in zip(lengths, budgets)]
    assert per_slot == [64, 64, 64, 128, 128]
    fits, used = [], 0
    for tokens in per_slot:                                  # placement in arrival order
        fits.append(used + tokens <= room_tokens)
        used += tokens if fits[-1] else 0
    alone = [generate_from_ids(runner, _ids(n, i), Sampling(max_new_tokens=m, min_new_tokens=m)).token_ids
             for i, (n, m) in enumerate(zip(lengths, budgets))]
    room = room_tokens * runner.kv_bytes_per_token
    runner.kv_budget = KVBudget(room)
    try:
        batch = DecodeBatch(runner, max_batch_size=8)
        states = []
        for i, (n, m) in enumerate(zip(lengths, budgets)):
            logits, kv = runner.prefill(_ids(n, i))
            states.append(batch.add(kv, logits[-1], Sampling(max_new_tokens=m, min_new_tokens=m)))
        assert [s._group is not None for s in states] == fits
        batch.run_until_done()
        assert [s.tokens for s in states] == alone
        assert runner.kv_budget.peak <= room and runner.kv_budget.used == 0
    finally:
        runner.kv_budget = KVBudget(None)


# ------------------------------------------------------------------------------------------------------------
# the scheduler: admission by KV bytes
# ------------------------------------------------------------------------------------------------------------
QUESTION = "How many legs do three spiders and two ants have together?"


def _agent(i: int) -> AgentTemplate:
    return AgentTemplate(f"agent{i}", f"You are helper number {i}.", "Question: {user_question}\nAnswer:")


class FailingRunner(ModelRunner):
    """A runner whose decode step raises once, at a chosen step (a stand-in for a CUDA error mid-batch); it counts
    its prefills."""

    fail_at: int | None = None
    decode_calls = 0
    prefill_calls = 0

    def prefill(self, *args, **kwargs):
        self.prefill_calls += 1
        return super().prefill(*args, **kwargs)

    def decode_step(self, groups, token_ids):
        self.decode_calls += 1
        if self.decode_calls == self.fail_at:
            raise RuntimeError("injected decode failure")
        return super().decode_step(groups, token_ids)


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    loaded = load_model(tiny_model_dir, random_weights=True, seed=4)
    runner = FailingRunner(loaded.spec, loaded.state_dict)
    return KVCommEngine(runner, loaded.tokenizer, KVCommConfig())


def _requests(engine: KVCommEngine, count: int, new_tokens: int) -> list[TurnRequest]:
    content = engine.make_input(QUESTION)
    sampling = Sampling(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return [TurnRequest(_agent(i), {"user_question": content}, mode="dense", sampling=sampling)
            for i in range(count)]


def test_turns_are_admitted_by_kv_bytes_and_never_fitting_ones_fail_naming_the_limit(tiny_engine):
    engine, runner = tiny_engine, tiny_engine.runner
    requests = _requests(engine, 5, 20)
    alone = [engine.run_turn(r).token_ids for r in requests]
    prompt = len(engine.prepare(requests[0]).prompt_ids)
    slot = capacity_class(prompt + 20) * runner.kv_bytes_per_token
    plan = plan_memory(engine.spec, runner.dtype, MemoryConfig(max_prompt_tokens=prompt + 8), device_type="cpu",
                       max_batch_size=8)
    plan = dataclasses.replace(plan, kv_bytes=2 * slot)               # room for exactly two such turns
    runner.kv_budget = KVBudget(plan.kv_bytes)
    scheduler = TurnScheduler(engine, max_batch_size=8, memory_plan=plan).start()
    try:
        futures = [scheduler.turn(r) for r in requests]
        too_long = scheduler.turn(dataclasses.replace(requests[0], sampling=Sampling(max_new_tokens=2 * 64)))
        assert [f.result(timeout=120).token_ids for f in futures] == alone
        with pytest.raises(KVBudgetError, match="KV budget is"):
            too_long.result(timeout=60)
        long_prompt = dataclasses.replace(requests[0], contents={"user_question": engine.make_input(QUESTION * 3)})
        with pytest.raises(KVBudgetError, match="memory.max_prompt_tokens"):
            scheduler.turn(long_prompt).result(timeout=60)
        stats = scheduler.stats()
        assert stats["max_batch"] == 2 and stats["turns_finished"] == 5 and stats["turns_failed"] == 2
        assert stats["kv_budget"]["peak_bytes"] <= 2 * slot and stats["decode_kv_bytes"] == 0
    finally:
        scheduler.stop()
        runner.kv_budget = KVBudget(None)


def test_a_template_or_input_longer_than_the_replica_admits_is_refused_before_its_kv(tiny_engine):
    """An engine given its replica's `max_prompt_tokens` refuses an input or an agent template no prompt could hold
    (both within the model's context) naming the knob, with no prefill run; shorter ones are computed."""
    runner = tiny_engine.runner
    engine = KVCommEngine(runner, tiny_engine.tokenizer, KVCommConfig(), max_prompt_tokens=48)
    long_text = " ".join(["Tom has 3 apples."] * 20)
    assert 48 < len(engine.encode(long_text)) < engine.spec.max_position_embeddings
    before = runner.prefill_calls
    with pytest.raises(ContextLengthError, match=r"input content: \d+ tokens; this replica admits prompts of at most "
                                                 r"memory.max_prompt_tokens = 48"):
        engine.make_input(long_text)
    with pytest.raises(ContextLengthError, match="memory.max_prompt_tokens = 48"):
        engine.agent_state(AgentTemplate("long", long_text, "{user_question}"))
    assert runner.prefill_calls == before
    assert engine.make_input(QUESTION).num_tokens <= 48 and runner.prefill_calls > before


def test_a_failed_decode_step_frees_every_decode_buffer(tiny_engine):
    engine, runner = tiny_engine, tiny_engine.runner
    runner.kv_budget = KVBudget(None)
    scheduler = TurnScheduler(engine, max_batch_size=8)
    requests = _requests(engine, 3, 12)
    runner.decode_calls, runner.fail_at = 0, 4
    gate = threading.Event()
    scheduler.call(gate.wait)   # hold the model thread until all three turns are queued, so they share a batch
    scheduler.start()
    futures = [scheduler.turn(r) for r in requests]
    gate.set()
    try:
        for future in futures:
            with pytest.raises(RuntimeError, match="injected"):
                future.result(timeout=60)
        assert runner.kv_budget.used == 0 and scheduler.stats()["decode_kv_bytes"] == 0
        runner.fail_at = None
        assert len(scheduler.turn(requests[0]).result(timeout=60).token_ids) == 12   # the worker goes on
    finally:
        scheduler.stop()
        runner.fail_at = None


def test_agent_states_are_bounded_by_bytes(tiny_model_dir):
    engine = build_engine(tiny_model_dir, random_weights=True)
    states = [engine.agent_state(_agent(i)) for i in range(6)]
    each = sum(seg.nbytes for seg in states[0].fixed_kv)
    engine.agent_cache_bytes = 2 * each + each // 2
    engine.agents.clear()
    for i in range(6):
        engine.agent_state(_agent(i))
    assert engine.agents.bytes <= engine.agent_cache_bytes and len(engine.agents) == 2
    assert engine.agents.templates() == [_agent(4), _agent(5)]          # the most recently used stay


def test_a_mostly_emptied_decode_buffer_shrinks(tiny):
    """Twelve short and two long sequences of one class: once the short ones finish, the merged buffer holding
    the two long ones shrinks to a quarter or less, and the long ones decode on exactly as alone."""
    loaded, runner = tiny
    runner.kv_budget = KVBudget(None)
    lengths = [8 + i for i in range(14)]
    budgets = [3] * 12 + [20, 20]
    alone = [generate_from_ids(runner, _ids(n, i), Sampling(max_new_tokens=m, min_new_tokens=m)).token_ids
             for i, (n, m) in enumerate(zip(lengths, budgets))]
    batch = DecodeBatch(runner, max_batch_size=16)
    states = []
    for i, (n, m) in enumerate(zip(lengths, budgets)):
        logits, kv = runner.prefill(_ids(n, i))
        states.append(batch.add(kv, logits[-1], Sampling(max_new_tokens=m, min_new_tokens=m)))
    batch.step()
    (class_64,) = batch._groups.values()
    assert len(class_64) == 1 and class_64[0].kv.slots >= 14           # fourteen one-slot buffers merged
    peak_slots = class_64[0].kv.slots
    for _ in range(5):
        batch.step()
    assert len(batch.active) == 2
    batch.step()
    (class_64,) = batch._groups.values()
    assert [b.kv.slots for b in class_64] == [4] and 4 * 4 <= peak_slots
    batch.run_until_done()
    assert [s.tokens for s in states] == alone
