"""A corpus of bad inputs run through every command, the way an operator meets them.

    python benchmarks/bad_inputs.py [--out benchmarks/results] [--jobs 2] [-k SUBSTRING]

Each case writes its tiny files, runs one `fedrec` command as a real process and passes when
the command exits 2 (1 for a tampered ledger under `fedrec audit`: a violation, as
documented), prints no traceback, and its message names the file (and the line, where
the problem has one) or the option at fault. Malformed rating lines, out-of-range values,
oversized fields, control characters, bad option values, contradictory options, corrupted
device stores, ledgers and run records, a device that speaks plain HTTP to a TLS server.
Writes OUT/bad_inputs.json: the share that passes (target 100%) and every case's outcome.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

MOVIES = "1::Heat (1995)::Crime\n2::Alien (1979)::Sci-Fi\n"
COLUMNS = "user=user,item=item,time=ts"
HUGE = "7" * 50_000  # a field that must not be repeated whole in a message


@dataclass
class Case:
    name: str
    args: Callable[[Path], list[str]]  # the command line, given the case's folder
    files: dict[str, str | bytes] = field(default_factory=dict)  # relative path -> content
    names: tuple[str, ...] = ()  # what the message must name ({dir} = the case's folder)
    setup: Callable[[Path], None] | None = None
    # 2 = bad input; `fedrec audit` reports a tampered ledger as a violation of the run's
    # claims (exit 1, as its help and the README say), not as unreadable input
    exit: int = 2


def ml(ratings: str, movies: str = MOVIES) -> dict[str, str | bytes]:
    return {"ml/ratings.dat": ratings, "ml/movies.dat": movies}


def csv_file(text: str) -> dict[str, str | bytes]:
    return {"e.csv": text}


def data_ml(d: Path) -> list[str]:
    return ["data", "--dataset", "movielens", "--data-dir", str(d / "ml")]


def data_csv(d: Path) -> list[str]:
    return ["data", "--dataset", "csv", "--data-dir", str(d / "e.csv"), "--columns", COLUMNS]


def train_csv(d: Path) -> list[str]:
    return ["train", "--dataset", "csv", "--data-dir", str(d / "e.csv"), "--columns", COLUMNS,
            "--out", str(d / "out"), "--epochs", "1"]  # fmt: skip


def simulate(*extra: str) -> Callable[[Path], list[str]]:
    return lambda d: ["simulate", "--in-process", "--out", str(d / "run"), *extra]


def simulate_csv(d: Path) -> list[str]:
    return simulate("--dataset", "csv", "--data-dir", str(d / "e.csv"), "--columns", COLUMNS)(d)


def client(*extra: str) -> Callable[[Path], list[str]]:
    return lambda d: ["client", *extra[:1], "--store", str(d / "device"), *extra[1:]]


def device_store(d: Path) -> None:
    """A real device folder: a store with a few interactions of the built-in catalogue."""
    from fedrec.client.device import ingest
    from fedrec.common.data.loaders import load_builtin

    items = [str(i) for i in load_builtin().catalogue.item_ids[:20]]
    ingest(d / "device", [f"{items[k]},{1_000 + k}" for k in range(6)], set(items))


def ledger(d: Path, folder: str = "device") -> Path:
    """A real two-entry ledger (fedrec's own PrivacyLedger); returns its path."""
    from fedrec.client.ledger import PrivacyLedger
    from fedrec.common.privacy.accounting import Mechanism

    mech = Mechanism(noise_multiplier=1.0, sample_rate=1.0, steps=1, clip_norm=1.0, delta=1e-5)
    path = d / folder / "ledger.jsonl"
    with PrivacyLedger.open(path, fsync=False) as lg:
        lg.append_train(1, mech, {"w0001": 3})
        lg.append_train(2, mech, {"w0001": 3})
    return path


def corrupt_ledger_line_2(d: Path, folder: str = "device") -> None:
    path = ledger(d, folder)
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"round":2', '"round":7')  # an edited entry breaks the chain
    path.write_text("\n".join(lines) + "\n")


def torn_first_line(d: Path, folder: str = "device") -> None:
    """Line 1 cut short with line 2 after it: corruption, not a crash mid-append (a torn LAST
    line is what a crash leaves, and the ledger drops it with a warning by design)."""
    path = ledger(d, folder)
    first, second = path.read_text().splitlines()
    path.write_text(first[:-40] + "\n" + second + "\n")


def store_then(action: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        device_store(d)
        action(d)

    return setup


def garbage_store(d: Path) -> None:
    device_store(d)
    (d / "device" / "store.sqlite").write_bytes(b"not a database" * 300)


def audit_run(d: Path) -> list[str]:
    return ["audit", str(d / "run"), "--out", str(d / "report")]


CASES = [
    # ---- fedrec data: every loader, malformed files --------------------------------------
    Case(
        "data: a rating line with 3 fields",
        data_ml,
        ml("1::1::5::10\n1::2::5\n"),
        ("ratings.dat", "line 2"),
    ),
    Case(
        "data: a timestamp that is not a number",
        data_ml,
        ml("1::1::5::10\n1::2::5::x\n"),
        ("ratings.dat", "line 2"),
    ),
    Case("data: timestamp 1e300", data_ml, ml("1::1::5::1e300\n"), ("ratings.dat", "line 1")),
    Case(
        "data: timestamp 99999999999999999999999",
        data_ml,
        ml("1::2::5::7\n1::1::5::99999999999999999999999\n"),
        ("ratings.dat", "line 2"),
    ),
    Case("data: a rating that is nan", data_ml, ml("1::1::nan::10\n"), ("ratings.dat", "line 1")),
    Case(
        "data: an item not in the catalogue",
        data_ml,
        ml("1::1::5::10\n1::9::5::11\n"),
        ("ratings.dat", "line 2"),
    ),
    Case(
        "data: a duplicate movie id",
        data_ml,
        ml("1::1::5::10\n", MOVIES + "1::Again::x\n"),
        ("movies.dat", "line 3"),
    ),
    Case(
        "data: an empty user id",
        data_ml,
        ml("1::1::5::10\n::1::5::10\n"),
        ("ratings.dat", "line 2"),
    ),
    Case(
        "data: a NUL byte in an item id",
        data_ml,
        ml("1::1::5::10\n1::2\x00::5::11\n"),
        ("ratings.dat", "line 2", "control character"),
    ),
    Case(
        "data: ratings.dat without movies.dat",
        data_ml,
        {"ml/ratings.dat": "1::1::5::10\n"},
        ("movies.dat",),
    ),
    Case("data: an empty ratings file", data_ml, ml(""), ("ratings.dat",)),
    Case(
        "data: a 100k file with a short line",
        data_ml,
        {
            "ml/u.data": "1\t1\t5\t10\n1\t1\t5\n",
            "ml/u.item": "1|Heat (1995)|01-Jan-1995||x" + "|0" * 19 + "\n",
        },
        ("u.data", "line 2"),
    ),
    Case(
        "data: a latin-1 csv with a missing column",
        data_csv,
        csv_file("user,item\n1,é\n"),
        ("e.csv", "line 1", "'ts'"),
    ),
    Case(
        "data: a csv line with too few fields",
        data_csv,
        csv_file("user,item,ts\n1,a,5\n1,a\n"),
        ("e.csv", "line 3"),
    ),
    Case(
        "data: a csv field over 131,072 characters",
        data_csv,
        csv_file(f"user,item,ts\n1,a,5\n2,{'x' * 200_000},6\n"),
        ("e.csv", "line 3"),
    ),
    Case(
        "data: a 50,000-character timestamp (message cut)",
        data_csv,
        csv_file(f"user,item,ts\n1,a,{HUGE}z\n"),
        ("e.csv", "line 2", "50,001 characters"),
    ),
    Case(
        "data: a csv timestamp out of range",
        data_csv,
        csv_file("user,item,ts\n1,a,5\n1,b,-1e20\n"),
        ("e.csv", "line 3", "out of range"),
    ),
    Case(
        "data: a bad ISO date",
        lambda d: [*data_csv(d)[:-1], COLUMNS + ",time_format=iso"],
        csv_file("user,item,ts\n1,a,2020-13-01\n"),
        ("e.csv", "line 2"),
    ),
    Case("data: a csv with a header only", data_csv, csv_file("user,item,ts\n"), ("e.csv",)),
    Case(
        "data: an unsupported file type",
        lambda d: [*data_csv(d)[:4], str(d / "e.json"), "--columns", COLUMNS],
        {"e.json": "{}"},
        ("e.json",),
    ),
    Case(
        "data: --dataset csv without --columns",
        lambda d: data_csv(d)[:5],
        csv_file("user,item,ts\n1,a,5\n"),
        ("--columns",),
    ),
    Case(
        "data: --dataset movielens without --data-dir",
        lambda d: data_ml(d)[:3],
        {},
        ("--data-dir",),
    ),
    Case(
        "data: a data dir that does not exist",
        lambda d: [*data_ml(d)[:4], str(d / "nope")],
        {},
        ("nope",),
    ),
    # ---- fedrec train ----------------------------------------------------------------------
    Case(
        "train: a malformed csv",
        train_csv,
        csv_file("user,item,ts\n1,a,5\n1,a,x\n"),
        ("e.csv", "line 3"),
    ),
    Case("train: --epsilon nan", lambda d: ["train", "--epsilon", "nan"], {}, ("epsilon",)),
    Case("train: --epsilon inf", lambda d: ["train", "--epsilon", "inf"], {}, ("epsilon",)),
    Case("train: --seed -1", lambda d: ["train", "--seed", "-1"], {}, ("seed",)),
    Case("train: --protocol nope", lambda d: ["train", "--protocol", "nope"], {}, ("--protocol",)),
    # ---- fedrec simulate --in-process ------------------------------------------------------
    Case(
        "simulate: a malformed csv",
        simulate_csv,
        csv_file("user,item,ts\n1,a,5\n1,a,x\n"),
        ("e.csv", "line 3"),
    ),
    Case(
        "simulate: timestamp 1e300",
        simulate_csv,
        csv_file("user,item,ts\n1,a,1e300\n"),
        ("e.csv", "line 2"),
    ),
    Case(
        "simulate: a NUL in an item id",
        simulate_csv,
        csv_file("user,item,ts\n1,a,5\n1,a\x00,6\n"),
        ("e.csv", "line 3"),
    ),
    Case("simulate: --epsilon nan", simulate("--epsilon", "nan"), {}, ("epsilon",)),
    Case("simulate: --epsilon inf", simulate("--epsilon", "inf"), {}, ("epsilon",)),
    Case("simulate: --user-epsilon nan", simulate("--user-epsilon", "nan"), {}, ("user-epsilon",)),
    Case("simulate: --seed -1", simulate("--seed", "-1"), {}, ("seed",)),
    Case("simulate: --dp none", simulate("--dp", "none"), {}, ("dp", "use one of off")),
    Case("simulate: --dp central", simulate("--dp", "central"), {}, ("dp", "use one of off")),
    Case("simulate: --rounds 0", simulate("--rounds", "0"), {}, ("rounds",)),
    Case("simulate: --delta 2", simulate("--delta", "2"), {}, ("delta",)),
    Case(
        "simulate: an unknown key in --config",
        lambda d: [*simulate()(d), "--config", str(d / "x.toml")],
        {"x.toml": "roundz = 3\n"},
        ("roundz",),
    ),
    Case(
        "simulate: a --config that is not TOML",
        lambda d: [*simulate()(d), "--config", str(d / "x.toml")],
        {"x.toml": "rounds = = 3\n"},
        ("x.toml", "line 1"),
    ),
    Case("simulate: --resume on a folder with no run", simulate("--resume"), {}, ("run",)),
    # ---- fedrec audit ----------------------------------------------------------------------
    Case("audit: a folder that does not exist", audit_run, {}, ("run",)),
    Case(
        "audit: an edited ledger entry",
        audit_run,
        {},
        ("client 0", "line 2", "edited"),
        lambda d: corrupt_ledger_line_2(d, "run/clients/0"),
        exit=1,
    ),
    Case(
        "audit: a ledger line cut short",
        audit_run,
        {},
        ("client 0", "line 1 is not valid"),
        lambda d: torn_first_line(d, "run/clients/0"),
        exit=1,
    ),
    Case(
        "audit: a summary.json that is not JSON",
        audit_run,
        {"run/summary.json": "{oops"},
        ("summary.json",),
        lambda d: ledger(d, "run/clients/0"),
    ),
    # ---- fedrec client ---------------------------------------------------------------------
    Case(
        "client ingest: a file that does not exist", client("ingest", "nope.csv"), {}, ("nope.csv",)
    ),
    Case(
        "client ingest: a device config that is not TOML",
        lambda d: ["client", "ingest", str(d / "a.csv"), "--config", str(d / "dev.toml")],
        {"a.csv": "1,2\n", "dev.toml": "[device\n"},
        ("dev.toml",),
    ),
    Case(
        "client status: an edited ledger entry",
        client("status"),
        {},
        ("ledger.jsonl", "line 2"),
        store_then(corrupt_ledger_line_2),
    ),
    Case(
        "client status: a ledger line cut short",
        client("status"),
        {},
        ("ledger.jsonl", "line 1"),
        store_then(torn_first_line),
    ),
    Case(
        "client status: a store that is not a database",
        client("status"),
        {},
        ("store.sqlite",),
        garbage_store,
    ),
    Case(
        "client recommend: a device that never took part",
        client("recommend"),
        {},
        ("device", "no global model"),
        device_store,
    ),
    Case("client start: no server address", client("start"), {}, ("--superlink",), device_store),
    Case(
        "client start: --insecure against a TLS server",
        lambda d: [*client("start")(d), "--insecure", "--superlink", TLS["address"]],
        {},
        ("speaks TLS",),
        device_store,
    ),
]
TLS: dict[str, str] = {}
TRACEBACK = re.compile(r"Traceback \(most recent call last\)")


def tls_listener(folder: Path) -> str:
    """A TLS server on loopback for the --insecure case (it completes handshakes only)."""
    from fedrec.common.certs import create_server_cert

    cert, key = create_server_cert(folder, ["127.0.0.1"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            with conn:
                try:
                    conn.settimeout(2)
                    with context.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(1)
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{listener.getsockname()[1]}"


def run_case(case: Case, root: Path) -> dict:
    d = root / re.sub(r"[^a-z0-9]+", "-", case.name.lower()).strip("-")
    d.mkdir(parents=True)
    for rel, content in case.files.items():
        path = d / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("latin-1"))
    if case.setup is not None:
        case.setup(d)
    env = os.environ | {"FEDREC_CACHE_DIR": str(root / "cache"), "HF_HUB_OFFLINE": "1",
                        "FLWR_HOME": str(d / "flwr"), "COLUMNS": "200"}  # fmt: skip
    args = case.args(d)
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "fedrec.cli", *args],
                              capture_output=True, text=True, env=env, timeout=300, cwd=d)  # fmt: skip
        code, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        code, stderr = None, "timed out after 300 s"
    message = " ".join(stderr.replace("│", " ").split())  # typer's boxes wrap long messages
    missing = [n for n in case.names if n.format(dir=d) not in message]
    traceback = bool(TRACEBACK.search(stderr))
    return {
        "case": case.name,
        "command": "fedrec " + " ".join(a.replace(str(d), "DIR") for a in args),
        "exit": code,
        "traceback": traceback,
        "names": list(case.names),
        "missing_from_message": missing,
        "expected_exit": case.exit,
        "passed": code == case.exit and not traceback and not missing and len(message) < 2_000,
        "message": message[:400],
        "seconds": round(time.perf_counter() - start, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("-k", default="", help="only cases whose name contains this")
    args = parser.parse_args()
    cases = [c for c in CASES if args.k in c.name]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        TLS["address"] = tls_listener(root / "certs")
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda c: run_case(c, root), cases))
    for r in results:
        print(("pass " if r["passed"] else "FAIL ") + f"{r['case']}: exit {r['exit']}"
              + ("" if r["passed"] else f" | {r['message'][:300]}"))  # fmt: skip
    passed = sum(r["passed"] for r in results)
    summary = {
        "cases": len(results),
        "passed": passed,
        "share_passed": passed / len(results) if results else None,
        "criterion": "exit 2 (audit of a tampered ledger: 1), no traceback, the message names "
        "the file (and line) or the option",
        "by_command": {
            cmd: f"{sum(r['passed'] for r in rs)}/{len(rs)}"
            for cmd in ("data", "train", "simulate", "audit", "client")
            if (rs := [r for r in results if r["case"].startswith(cmd)])
        },
        "results": results,
    }
    print(f"{passed}/{len(results)} bad inputs rejected cleanly ({summary['share_passed']:.0%})")
    if not args.k:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bad_inputs.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
