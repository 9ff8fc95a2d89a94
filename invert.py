"""Stage 1: Explanatory Inversion -> the EI dataset on disk.

    python invert.py                                    # the oracle teacher, all four worlds
    python invert.py --teacher=out/x/ckpt/sft_ei.pt     # a checkpoint of ours as the teacher
    python invert.py --input_jsonl=mine.jsonl           # a user's records -> out/user-mine/data
    python invert.py --input_jsonl=mine.jsonl \
        --teacher=http://127.0.0.1:8000/v1 --teacher_model=NAME
                                                        # an LLM teacher writes what records lack

Problems (worlds.py) -> the teacher's rationale (a problem it gets wrong is dropped) -> the EI
rules -> the teacher answers each EI probe (a probe it gets wrong is dropped) -> consistency filter
(Eq. 1: the teacher re-answers Q with the probe dialogue in front; the probe stays only if it still
gets A) -> out_dir/data/{split}.jsonl (every world in one file per split, in world order) and
stats.json. The teacher filters shape the training data only: val, test_id and the OOD splits keep
every problem with the exact rationale and exact EI probes, so every method is measured on the
same yardstick.

A user's records need only question and answer when the teacher is an LLM behind an
OpenAI-compatible server (llm_teacher.py holds its prompts, client and cache): it writes the
rationale of a training Q, tried up to teacher_tries times until it reaches A (else Q is dropped),
writes one EI probe per rule as JSON (probe, rationale, answer), answers each probe alone (a probe
it answers otherwise is dropped) and Eq. 1 follows, all through the same functions as the other
teachers. The other splits are scored on A alone: a record there without a rationale gets
"The answer is A.".
"""

import glob
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import tasks
from configurator import atomic_write, cli, parse_config, pick_device
from llm_teacher import ChatClient, LLMTeacher, is_long
from model import load_model
from tasks import dialogue_ids, extract_answer, is_correct, load_records, prompt_ids, response_ids
from tokenizer import decode_generated, get_tokenizer
from worlds import OOD_SPLITS, ORD, SPLITS, WORLDS, make_dataset


@dataclass
class Config:
    # writes out_dir/data/{split}.jsonl and stats.json; default out/default, or
    # out/user-<file stem> with input_jsonl
    out_dir: str = ""
    worlds: str = "arith,coin,date,swap"  # comma-separated worlds of worlds.py (light too)
    n_train: int = 2000  # problems per world in train
    n_val: int = 200  # ... in val and in each validation copy val_ood_*
    n_test: int = 300  # ... in test_id
    n_ood: int = 300  # ... in each of ood_long, ood_reverse, ood_names
    min_events: int = 2  # events per problem (every split but ood_long)
    max_events: int = 5
    long_min_events: int = 6  # events per ood_long problem: more than any training one, by one
    long_max_events: int = 6  # (the tiny student reached 6 more often than 6-7: measured)
    min_facts: int = 1  # distractor facts per problem (the premise rule asks about one)
    max_facts: int = 8  # ... up to: long questions train the positions ood_long needs
    # each count of facts this times as likely as one fewer: most questions short (uniform counts
    # cost coin 20+ points), a few long
    facts_decay: float = 0.6
    long_min_facts: int = 0  # ... per ood_long problem: fewer, to stay inside those lengths
    long_max_facts: int = 1
    reverse_share: float = 0.1  # train questions asked backwards (ood_reverse's rare skill)
    # EI rules; adding 'inverse' gives the RevThink-style data
    rules: str = ",".join(tasks.DEFAULT_RULES)
    seed: int = 1337
    # 'oracle' (the exact solver), a checkpoint answering greedily, or http://HOST:PORT/v1: an LLM
    # on an OpenAI-compatible server
    teacher: str = "oracle"
    teacher_batch: int = 64  # prompts per generate call of a checkpoint teacher
    teacher_max_new_tokens: int = 128  # tokens per answer (an LLM teacher: per request, max_tokens)
    teacher_model: str = ""  # the model name the LLM teacher's server serves
    # an LLM teacher's rationales of a Q until one reaches A (greedy, then sampled)
    teacher_tries: int = 4
    teacher_temperature: float = 0.7  # ... at this temperature, each try its own seed (seed + try)
    teacher_workers: int = 4  # an LLM teacher's requests in flight
    teacher_timeout: float = 120.0  # seconds a request may take before it is retried
    # retries of a request after a 429, a 5xx, a timeout or a lost connection
    teacher_retries: int = 5
    teacher_backoff: float = 1.0  # seconds before the first retry, doubling after each
    device: str = "cpu"
    input_jsonl: str = ""  # a user's JSONL (question, answer, rationale, probes) instead
    n_examples: int = 1  # examples printed per world
    overwrite: bool = False  # may replace a data/ folder made with other settings


# every number of Config: an interval (configurator.check_fields)
LIMITS = dict(
    **dict.fromkeys(
        (
            "n_train",
            "min_events",
            "max_events",
            "long_min_events",
            "long_max_events",
            "teacher_batch",
            "teacher_max_new_tokens",
            "teacher_tries",
            "teacher_workers",
        ),
        "[1, inf)",
    ),
    **dict.fromkeys(
        (
            "n_val",
            "n_test",
            "n_ood",
            "min_facts",
            "max_facts",
            "long_min_facts",
            "long_max_facts",
            "seed",
            "n_examples",
            "teacher_temperature",
            "teacher_retries",
            "teacher_backoff",
        ),
        "[0, inf)",
    ),
    reverse_share="[0, 1]",
    facts_decay="(0, inf)",
    teacher_timeout="(0, inf)",
)
# settings that do not change the data
SAME_DATA_IGNORES = (
    "out_dir",
    "n_examples",
    "overwrite",
    "device",
    "teacher_workers",
    "teacher_timeout",
    "teacher_retries",
    "teacher_backoff",
)


class CheckpointTeacher:
    """A GPT checkpoint of ours answering greedily through the student's prompt format. A prompt it
    cannot read (a token outside its vocabulary, too long for its block) gets an empty response: a
    wrong one."""

    def __init__(self, path, device="cpu", batch_size=64, max_new_tokens=128):
        self.model, self.tok, _ = load_model(path, device)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    def prompt(self, turns, question):
        try:
            ids = dialogue_ids(self.tok, turns, question)
        except ValueError:
            return None
        return ids if len(ids) + self.max_new_tokens <= self.model.config.block_size else None

    @torch.no_grad()
    def respond(self, dialogues):
        """dialogues: [(turns [(question, response)], question)] -> [response text]."""
        prompts = [self.prompt(turns, q) for turns, q in dialogues]
        out = [""] * len(prompts)
        readable = [i for i, p in enumerate(prompts) if p is not None]
        todo = sorted(readable, key=lambda i: len(prompts[i]))  # by length: a batch pads less
        for b in tqdm(range(0, len(todo), self.batch_size), desc="teacher", leave=False):
            rows = todo[b : b + self.batch_size]
            tokens, mask = self.model.generate(
                [prompts[i] for i in rows], self.max_new_tokens, temperature=0, eot=self.tok.eot
            )
            for i, text in zip(rows, decode_generated(self.tok, tokens, mask)):
                out[i] = text.strip()
        return out


def teacher_rationales(teacher, records, tries=1):
    """The teacher's rationale for each Q, None where it never reaches A. The first try is greedy;
    an LLM teacher answers the Qs still wrong again, sampled, up to tries in all (the other teachers
    are greedy: one try). Returns (rationales, {tries it took: questions})."""
    said, took, todo = [None] * len(records), Counter(), list(range(len(records)))
    for attempt in range(tries):
        dialogues = [([], records[i]["question"]) for i in todo]
        answers = (
            teacher.respond(dialogues, attempt=attempt) if attempt else teacher.respond(dialogues)
        )
        for i, t in zip(todo, answers):
            if is_correct(records[i]["world"], t, records[i]["answer"], records[i]["question"]):
                said[i], took[attempt + 1] = t, took[attempt + 1] + 1
        todo = [i for i in todo if said[i] is None]
        if not todo:
            break
    return said, dict(took)


def teacher_probe_answers(teacher, records):
    """The teacher answers each EI probe alone; the probe stays, that answer its rationale, when it
    reaches the probe's answer (the record keeps the exact one), else it is dropped. An LLM teacher
    words the answers of its own probes freely: where a long one (more than three words, not a
    number) does not match letter for letter, it judges whether its two wordings agree, and a probe
    it keeps takes the answer as said. Returns (records, removed per rule)."""
    flat = [(i, pr) for i, r in enumerate(records) for pr in r["probes"]]
    said = teacher.respond([([], pr["question"]) for _, pr in flat])
    ok = [
        is_correct(records[i]["world"], t, pr["answer"], pr["question"])
        for (i, pr), t in zip(flat, said)
    ]
    answer = [pr["answer"] for _, pr in flat]
    if isinstance(teacher, LLMTeacher):
        long = [
            k
            for k, ((_, pr), t) in enumerate(zip(flat, said))
            if not ok[k] and is_long(pr["answer"]) and extract_answer(t)
        ]
        same = teacher.judge(
            [(flat[k][1]["question"], answer[k], extract_answer(said[k])) for k in long]
        )
        for k, s in zip(long, same):
            ok[k], answer[k] = s, extract_answer(said[k])
    probes, wrong = [[] for _ in records], Counter()
    for (i, pr), t, good, a in zip(flat, said, ok, answer):
        if good:
            probes[i].append({**pr, "rationale": t, "answer": a})
        else:
            wrong[pr["rule"]] += 1
    return [{**r, "probes": p} for r, p in zip(records, probes)], dict(wrong)


def teacher_answers(teacher, records, tries=1):
    """The teacher's rationale for each Q (Q dropped when it is wrong) and for each EI probe (the
    probe dropped when it is wrong). Returns (records, counts)."""
    said, _ = teacher_rationales(teacher, records, tries)
    kept = [{**r, "rationale": t} for r, t in zip(records, said) if t is not None]
    kept, wrong = teacher_probe_answers(teacher, kept)
    return kept, {"removed_teacher_wrong": len(records) - len(kept), "removed_probe_wrong": wrong}


def consistency_filter(teacher, records):
    """Eq. 1: keep probe k of Q only if the teacher, shown [probe_k, its rationale and answer, Q],
    still answers Q with A. Returns (records, removed probes per rule)."""
    flat = [(i, pr) for i, r in enumerate(records) for pr in r["probes"]]
    said = teacher.respond(
        [([(pr["question"], pr["rationale"])], records[i]["question"]) for i, pr in flat]
    )
    probes, removed = [[] for _ in records], Counter()
    for (i, pr), t in zip(flat, said):
        r = records[i]
        if is_correct(r["world"], t, r["answer"], r["question"]):
            probes[i].append(pr)
        else:
            removed[pr["rule"]] += 1
    return [{**r, "probes": p} for r, p in zip(records, probes)], dict(removed)


def write_jsonl(path, records):
    """Atomically (a temp file in the same folder, then a rename), keys sorted: byte-identical
    reruns. A file that already holds these bytes is left alone, so its modification time, by which
    evaluate.py --reuse trusts earlier scores, survives a rerun (run.sh --resume reruns this
    stage)."""
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode("utf-8")
    same_size = os.path.isfile(path) and os.path.getsize(path) == len(text)
    if not (same_size and open(path, "rb").read() == text):
        atomic_write(path, text)


def percentiles(values):
    v = sorted(values) or [0]
    return {f"p{q}": v[min(len(v) - 1, len(v) * q // 100)] for q in (50, 90, 99)} | {"max": v[-1]}


def token_lengths(records, ks=(3, 5)):
    """GPT-2 token counts of the prompts and responses, and of the longest EXGRPO dialogue of each
    Q (its k longest probe turns, then Q and its response): what block_size must hold."""
    tok = get_tokenizer()
    q = {r["question"]: len(prompt_ids(tok, r["question"])) for r in records}
    a = {r["rationale"]: len(response_ids(tok, r["rationale"])) for r in records}
    turns = [
        [
            len(prompt_ids(tok, p["question"])) + len(response_ids(tok, p["rationale"]))
            for p in r["probes"]
        ]
        for r in records
    ]
    pq = [len(prompt_ids(tok, p["question"])) for r in records for p in r["probes"]]
    pa = [len(response_ids(tok, p["rationale"])) for r in records for p in r["probes"]]
    return {
        "question": percentiles(q.values()),
        "rationale": percentiles(a.values()),
        "probe_question": percentiles(pq),
        "probe_rationale": percentiles(pa),
    } | {
        f"dialogue_k{k}_longest": percentiles(
            sum(sorted(t)[-k:]) + q[r["question"]] + a[r["rationale"]]
            for r, t in zip(records, turns)
        )
        for k in ks
    }


def curate(teacher, records, rules, tries=1):
    """D_EI from one world's training problems: the teacher's answers, then Eq. 1.
    Returns (records, stats)."""
    made, n = Counter(pr["rule"] for r in records for pr in r["probes"]), len(records)
    kept, stats = teacher_answers(teacher, records, tries)
    kept, stats["removed_inconsistent"] = consistency_filter(teacher, kept)
    return kept, {
        "problems_generated": n,
        "probes_made": dict(made),
        "not_applicable": {rule: n - made[rule] for rule in rules if made[rule] < n},
        **stats,
        "probes_kept": dict(Counter(pr["rule"] for r in kept for pr in r["probes"])),
    }


def synthetic(cfg, worlds, rules):
    """{split: records} from worlds.py's worlds, the training split through the teacher, and
    stats."""
    sizes = {
        "train": cfg.n_train,
        "val": cfg.n_val,
        "test_id": cfg.n_test,
        "ood_long": cfg.n_ood,
        "ood_reverse": cfg.n_ood,
        "ood_names": cfg.n_ood,
    } | {f"val_{s}": cfg.n_val for s in OOD_SPLITS}
    teacher = make_teacher(cfg)
    tries = cfg.teacher_tries if isinstance(teacher, LLMTeacher) else 1
    data, filters = {s: [] for s in SPLITS}, {}
    for world in worlds:
        problems = make_dataset(
            world,
            sizes,
            cfg.seed,
            (cfg.min_events, cfg.max_events),
            (cfg.long_min_events, cfg.long_max_events),
            (cfg.min_facts, cfg.max_facts),
            (cfg.long_min_facts, cfg.long_max_facts),
            cfg.reverse_share,
            cfg.facts_decay,
        )
        for split, ps in problems.items():
            recs = [
                tasks.to_record(p, tasks.ei_probes(p, rules, cfg.seed))
                for p in tqdm(ps, desc=f"{world} {split}", leave=False)
            ]
            if split == "train":
                recs, filters[world] = curate(
                    teacher or tasks.OracleTeacher(recs), recs, rules, tries
                )
            data[split] += recs
    return data, {"train_filters": filters}


def invert_with_llm(teacher, records, rules, tries):
    """Stage 1 on a user's training records with an LLM teacher: its rationale where a record has
    none (a Q it never answers with A is dropped), its EI probes where a record has none (one
    request per rule, each probe then answered by the teacher alone), then Eq. 1 over every probe.
    What the user wrote is kept as written. Returns (records, stats)."""
    todo = [i for i, r in enumerate(records) if r["rationale"] is None]
    said, took = teacher_rationales(teacher, [records[i] for i in todo], tries)
    rationale = [r["rationale"] for r in records]
    for i, t in zip(todo, said):
        rationale[i] = t
    kept = [{**r, "rationale": t} for r, t in zip(records, rationale) if t is not None]
    bare = [k for k, r in enumerate(kept) if not r["probes"]]
    written, unusable = teacher.write_probes([kept[k] for k in bare], rules)
    asked = [{**kept[k], "probes": p} for k, p in zip(bare, written)]
    answered, wrong = teacher_probe_answers(teacher, asked)
    for k, r in zip(bare, answered):
        kept[k] = r
    kept, inconsistent = consistency_filter(teacher, kept)
    return kept, {
        "problems_given": len(records),
        "rationales_written": len(todo),
        "rationale_tries": took,
        "removed_teacher_wrong": len(records) - len(kept),
        "probes_asked": {rule: len(bare) for rule in rules},
        "probes_unusable": unusable,
        "removed_probe_wrong": wrong,
        "removed_inconsistent": inconsistent,
        "probes_kept": dict(Counter(pr["rule"] for r in kept for pr in r["probes"])),
        "answer_check": (
            'the last "The answer is X." against the answer, normalised; a probe answer of '
            "more than three words (not a number) that differs is judged by the teacher itself"
        ),
        "judged": {"asked": teacher.judged["asked"], "same": teacher.judged["same"]},
    }


def user_data(cfg, rules):
    """The user's records, each in its split (train unless it says otherwise: test_id records are
    what evaluate.py scores); with a checkpoint teacher, train through the consistency filter (the
    oracle only knows the generated questions, so with it the user's probes are kept as they are);
    with an LLM teacher, train through invert_with_llm."""
    data, llm = {}, is_server(cfg.teacher)
    for r in load_records(cfg.input_jsonl, rationale=not llm):
        if r["split"] not in SPLITS:
            raise SystemExit(
                f"{cfg.input_jsonl}: record {r['id']} has split {r['split']!r}; "
                f"the splits are {', '.join(SPLITS)}"
            )
        data.setdefault(r["split"], []).append(r)
    if not data.get("train"):
        raise SystemExit(
            f"{cfg.input_jsonl} has no training records "
            "(those without a split, or with split train)"
        )
    data = {s: data[s] for s in SPLITS if s in data}
    teacher = make_teacher(cfg)
    if teacher is None:
        skipped = "skipped: the oracle only knows the generated questions"
        return data, {"consistency_filter": skipped}
    if not llm:
        data["train"], removed = consistency_filter(teacher, data["train"])
        return data, {"train_filters": {"removed_inconsistent": removed}}
    for split in set(data) - {"train"}:
        data[split] = [
            {**r, "rationale": r["rationale"] or f"The answer is {r['answer']}."}
            for r in data[split]
        ]
    data["train"], filters = invert_with_llm(teacher, data["train"], rules, cfg.teacher_tries)
    c = teacher.client.stats
    print(
        f"teacher {cfg.teacher_model} at {cfg.teacher}: {c['sent']} requests sent, "
        f"{c['cached']} answered from the cache {teacher.client.cache_dir}, "
        f"{c['retried']} retried, {c['refused']} refused (HTTP 400), "
        f"{c['truncated']} cut at --teacher_max_new_tokens"
    )
    if not data["train"]:
        raise SystemExit(
            f"the teacher reached the answer of none of the {filters['problems_given']} training "
            f"questions in {cfg.teacher_tries} tries: use a stronger teacher or check the answers"
        )
    requests = {k: c[k] for k in ("prompt_tokens", "completion_tokens", "refused", "truncated")}
    return data, {"train_filters": {"user": filters}, "teacher_requests": requests}


def is_server(teacher):
    return teacher.startswith(("http://", "https://"))


def make_teacher(cfg):
    """None for the oracle (it is built from the records it answers), an LLM teacher for a server
    address (its cache in out_dir/teacher_cache), else a checkpoint of ours."""
    if cfg.teacher == "oracle":
        return None
    if not is_server(cfg.teacher):
        return CheckpointTeacher(
            cfg.teacher, cfg.device, cfg.teacher_batch, cfg.teacher_max_new_tokens
        )
    if not cfg.teacher_model:
        raise SystemExit(
            f"--teacher={cfg.teacher} is a server: name the model it serves with "
            f"--teacher_model=NAME (GET {cfg.teacher.rstrip('/')}/models lists them)"
        )
    client = ChatClient(
        cfg.teacher,
        cfg.teacher_model,
        os.path.join(cfg.out_dir, "teacher_cache"),
        cfg.teacher_workers,
        cfg.teacher_timeout,
        cfg.teacher_retries,
        cfg.teacher_backoff,
    )
    return LLMTeacher(client, cfg.teacher_max_new_tokens, cfg.teacher_temperature, cfg.seed)


def check_data_folder(cfg, folder):
    """Stop before replacing a data/ folder made with other settings (another run's data, or a
    user's), unless --overwrite=True: the checkpoints beside it were trained on that data."""
    if cfg.overwrite or not glob.glob(os.path.join(folder, "*.jsonl")):
        return
    path, ours = os.path.join(folder, "stats.json"), asdict(cfg)
    try:
        old = json.load(open(path, encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError, TypeError):
        old = None  # no readable stats.json: data of unknown settings
    defaults = asdict(Config())  # a setting added after the data was made had its default then
    differ = [
        k
        for k in ours
        if k not in SAME_DATA_IGNORES and (old is None or old.get(k, defaults[k]) != ours[k])
    ]
    if differ:
        raise SystemExit(
            f"{folder} holds data made with other settings ({', '.join(differ[:4])} differ): pass "
            f"--overwrite=True to replace it, or choose another --out_dir"
        )


def build(cfg):
    """Write out_dir/data/*.jsonl and stats.json (never over data made with other settings, unless
    cfg.overwrite); return (data, stats)."""
    worlds, rules = cfg.worlds.split(","), cfg.rules.split(",")
    for what, names, known in (("world", worlds, WORLDS), ("rule", rules, tasks.EI_RULES)):
        if not set(names) <= set(known):
            raise SystemExit(
                f"unknown {what} {sorted(set(names) - set(known))}; choose from {','.join(known)}"
            )
    lo, hi = cfg.min_events, cfg.max_events
    long_lo, long_hi = cfg.long_min_events, cfg.long_max_events
    if not 1 <= lo <= hi < long_lo <= long_hi <= len(ORD):
        raise SystemExit(
            "need 1 <= min_events <= max_events < long_min_events <= long_max_events <= 10 "
            "(ood_long must be longer than every training problem)"
        )
    stem = os.path.splitext(os.path.basename(cfg.input_jsonl))[0]
    cfg.out_dir = cfg.out_dir or (f"out/user-{stem}" if cfg.input_jsonl else "out/default")
    folder = os.path.join(cfg.out_dir, "data")
    check_data_folder(cfg, folder)
    data, stats = user_data(cfg, rules) if cfg.input_jsonl else synthetic(cfg, worlds, rules)
    os.makedirs(folder, exist_ok=True)
    # with --overwrite, a split of the old data that the new one lacks goes too
    for split in SPLITS:
        path = os.path.join(folder, f"{split}.jsonl")
        if split in data:
            write_jsonl(path, data[split])
        elif os.path.exists(path):
            os.remove(path)
    stats = {
        "config": asdict(cfg),
        "splits": {
            s: {
                w: {
                    "problems": sum(r["world"] == w for r in recs),
                    "probes": sum(len(r["probes"]) for r in recs if r["world"] == w),
                }
                for w in sorted({r["world"] for r in recs})
            }
            for s, recs in data.items()
        },
        **stats,
        "token_lengths_gpt2_train": token_lengths(data["train"]),
    }
    text = json.dumps(stats, indent=1, sort_keys=True) + "\n"
    atomic_write(os.path.join(folder, "stats.json"), text)
    return data, stats


def report(data, stats, cfg):
    """Print a few training examples (each with its first EI probes) and the stats."""
    printed = Counter()
    for r in data["train"]:
        if printed[r["world"]] < cfg.n_examples:
            printed[r["world"]] += 1
            print(f"[{r['id']}] Q: {r['question']}\n  A: {r['rationale']}")
            story = r["question"][: r["latent"]["query_start"]] if r["latent"] else r["question"]
            for pr in r["probes"][:3]:
                q = pr["question"]
                if q.startswith(story):
                    q = "... " + q[len(story) :]  # the story is printed above
                print(f"  {pr['rule']}: {q}\n    -> {pr['rationale']}")
    for split, by_world in stats["splits"].items():
        counts = [f"{w} {c['problems']} problems {c['probes']} probes" for w, c in by_world.items()]
        print(f"{split:12s}" + "  ".join(counts))
    for world, f in stats.get("train_filters", {}).items():
        shown = {k: v for k, v in f.items() if k != "probes_made"}
        print(f"train filters {world}: {json.dumps(shown, sort_keys=True)}")
    for what, p in stats["token_lengths_gpt2_train"].items():
        print(f"tokens {what:20s} " + " ".join(f"{k} {v}" for k, v in p.items()))


def main(argv):
    cfg = parse_config(Config(), argv, LIMITS)
    cfg.device = pick_device(cfg.device)
    t0 = time.time()
    data, stats = build(cfg)
    report(data, stats, cfg)
    print(f"wrote {os.path.join(cfg.out_dir, 'data')} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    cli(main)
