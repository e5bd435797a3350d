"""Bad input on every command is one line on stderr and exit 2, never a traceback.

Commands: run (programs, the tour, scenario files), compare, migrate, audit,
plugins, new-plugin, and the group itself.  Each case is the command line (run
in a folder holding the files below) and a piece of the expected message.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from pagetrack.cli import main

FILES = {
    "ok.s": "hlt\n",
    "bad.s": "frobnicate rax\nhlt\n",
    "fault.s": "mov qword ptr [0x7000000000], rax\nhlt\n",
    "empty.bin": "",
    "notlog.jsonl": "garbage\n",
    "ok.toml": '[workload]\nprogram = "tour"\n',
    "bad-program.toml": '[workload]\nprogram = "bad.s"\n',
    "fault.toml": '[workload]\nprogram = "fault.s"\n',
    "a-file": "",
}

COMMANDS = [
    # the group
    (["nosuch"], "No such command 'nosuch'"),
    (["--bogus"], "No such option '--bogus'"),
    # run: programs
    (["run", "missing.s"], "missing.s: no such file"),
    (["run", "--mem-mib", "0", "ok.s"], "--mem-mib"),
    (["run", "--mem-mib", "247", "ok.s"], "1<=x<=246"),
    (["run", "--bogus"], "No such option '--bogus'"),
    (["run", "ok.s", "--track", "zz"], "--track 'zz'"),
    (["run", "ok.s", "--track", "5-3"], "empty or negative range"),
    (["run", "ok.s", "-D", "N"], "expected NAME=VALUE"),
    (["run", "ok.s", "-D", "N=x"], "is not an integer"),
    (["run", "ok.s", "--dirty-log", "nope"], "--dirty-log"),
    (["run", "ok.s", "--backend", "qemu"], "--backend"),
    (["run", "ok.s", "--max-instructions", "0"], "--max-instructions"),
    (["run", "ok.s", "--audit-level", "trace"], "--audit-level"),
    (["run", "bad.s"], "bad.s: cannot assemble"),
    (["run", "empty.bin"], "empty.bin: empty program"),
    (["run", "empty.bin", "-D", "N=1"], "-D applies to assembly sources only"),
    (["run", "ok.s", "--backend", "kvm", "--dirty-log", "pml"], "simulator-only"),
    (["run", "ok.s", "--backend", "kvm", "--track", "0x400"], "need the simulator"),
    # run: the tour takes no options but --json and --audit-log
    (["run", "-D", "N=1"], "the tour takes none"),
    (["run", "--shadow"], "the tour takes none"),
    (["run", "--dirty-log", "ring"], "the tour takes none"),
    # run: a scenario file sets everything else
    (["run", "missing.toml"], "missing.toml: no such file"),
    (["run", "ok.toml", "--shadow"], "set in the scenario file"),
    (["run", "ok.toml", "-D", "N=1", "--mem-mib", "8"], "-D, --mem-mib: set in the scenario file"),
    (["run", "bad-program.toml"], "bad.s: cannot assemble"),
    # compare
    (["compare"], "Missing argument 'PROGRAM'"),
    (["compare", "missing.s"], "missing.s: no such file"),
    (["compare", "ok.s", "--initially-set"], "--initially-set needs --mode clear"),
    (["compare", "ok.s", "--mode", "pml"], "--mode"),
    (["compare", "bad.s"], "cannot assemble"),
    # migrate
    (["migrate", "--workload", "nope"], "unknown workload 'nope'"),
    (["migrate", "--bandwidth", "fast"], "--bandwidth 'fast'"),
    (["migrate", "--bandwidth", "0"], "more than 0 bytes/s"),
    (["migrate", "ok.s", "--workload", "hotset"], "not both"),
    (["migrate", "ok.s", "--rate", "5"], "a PROGRAM takes --ips"),
    (["migrate", "--ips", "3"], "--ips applies to a PROGRAM"),
    (["migrate", "--mode", "bogus"], "unknown mode 'bogus'"),
    (["migrate", "--mem-mib", "0"], "--mem-mib"),
    (["migrate", "--downtime-ms", "0"], "--downtime-ms"),
    (["migrate", "missing.s"], "missing.s: no such file"),
    # audit
    (["audit"], "Missing argument 'LOG'"),
    (["audit", "missing.jsonl"], "missing.jsonl: no such audit log"),
    (["audit", "notlog.jsonl"], "not an audit log"),
    (["audit", "."], "is a directory"),
    # plugins
    (["plugins", "extra"], "unexpected extra argument"),
    (["plugins", "--bogus"], "No such option '--bogus'"),
    # new-plugin
    (["new-plugin"], "Missing argument 'NAME'"),
    (["new-plugin", "9lives"], "NAME '9lives': must start with a letter"),
    (["new-plugin", "my tracker"], "must start with a letter and hold only"),
    (["new-plugin", "class"], "'class' cannot be a module name"),
    (["new-plugin", "pagetrack"], "cannot be a module name"),
    (["new-plugin", "dirty_log"], "a plugin called 'dirty_log' is already installed"),
    (["new-plugin", "json"], "a module 'json' already exists"),
    (["new-plugin", "ok.s"], "must start with a letter and hold only"),
    (["new-plugin", "a-file"], "already exists; choose another NAME or DIR"),
    (["new-plugin", "fresh", "a-file"], "DIR 'a-file': is not a directory"),
    (["new-plugin", "a", "b", "c"], "unexpected extra argument"),
]

SCENARIOS = [
    ('name = 3\n[workload]\nprogram = "tour"\n', "name: must be a string"),
    ('[vmm]\n[workload]\nprogram = "tour"\n', "vmm: unknown key (did you mean 'vm'?)"),
    ('[vm]\nmemory_mib = 0\n[workload]\nprogram = "tour"\n', "vm.memory_mib: must be an integer between 1 and 246"),
    ('[vm]\nmemory_mib = "16"\n[workload]\nprogram = "tour"\n', "vm.memory_mib: must be an integer between 1 and 246"),
    ('[vm]\nmemory_mib = 247\n[workload]\nprogram = "tour"\n', "vm.memory_mib: must be an integer between 1 and 246"),
    ('[vm]\npaging = "ept"\n[workload]\nprogram = "tour"\n', "vm.paging: must be one of tdp, shadow, not 'ept'"),
    ('[vm]\nvcpus = 0\n[workload]\nprogram = "tour"\n', "vm.vcpus: must be an integer between 1 and 64"),
    ('[vm]\nvcpus = true\n[workload]\nprogram = "tour"\n', "vm.vcpus: must be an integer between 1 and 64"),
    ('[vm]\nmemory = 16\n[workload]\nprogram = "tour"\n', "vm.memory: unknown key"),
    ('vm = 3\n[workload]\nprogram = "tour"\n', "vm: must be a table"),
    ('[vm]\nmemory_mib = 16\n', "workload: missing"),
    ('[workload]\nprogram = "tour"\ntrace = "hotset"\n', "workload: give exactly one of program"),
    ('[workload]\nmax_instructions = 5\n', "workload: give exactly one of program"),
    ('[workload]\nprogram = "nosuch"\n', "workload.program: no built-in program 'nosuch'"),
    ('[workload]\nprogram = "missing.s"\n', "workload.program: no such file"),
    ('[workload]\nprogram = 5\n', "workload.program: must be a string"),
    ('[workload]\nprogram = "tour"\ndefines = { N = "x" }\n', "workload.defines.N: must be an integer"),
    ('[workload]\nprogram = "tour"\nmax_instructions = 0\n', "workload.max_instructions: must be an integer of at least 1"),
    ('[workload]\nprogram = "tour"\nrate = 5\n', "workload.rate: applies to a trace workload"),
    ('[workload]\nprogram = "tour"\nrepeat = 5\n', "workload.repeat: unknown key"),
    ('[workload]\ntrace = "nope"\n', "workload.trace: unknown trace generator 'nope'"),
    ('[workload]\ntrace = "hotset"\nduration = 0\n', "workload.duration: must be a number > 0"),
    ('[workload]\ntrace = "hotset"\nrate = -1\n', "workload.rate: must be a number >= 0"),
    ('[workload]\ntrace = "hotset"\nrounds = 0\n', "workload.rounds: must be an integer between 1 and 10000"),
    ('[workload]\ntrace = "hotset"\nseed = 1.5\n', "workload.seed: must be an integer"),
    ('[workload]\ntrace = "hotset"\nparams = { bogus = 1 }\n', "workload.params.bogus: not a parameter of hotset"),
    ('[workload]\ntrace = "hotset"\nparams = { hot_fraction = "x" }\n', "workload.params.hot_fraction: must be a number"),
    ('[workload]\ntrace = "hotset"\nparams = { hot_fraction = 2 }\n', "workload.params: hotset: hot_fraction must be in (0, 1]"),
    ('[workload]\ntrace = "fixed_rate"\nparams = { stores_per_page = 1.5 }\n',
     "workload.params.stores_per_page: must be an integer"),
    ('[workload]\ntrace = "uniform"\nrate = 1e9\nduration = 1\n', "workload.duration: rate × duration"),
    ('[workload]\ntrace = "uniform"\ndefines = { N = 1 }\n', "workload.defines: applies to a program workload"),
    ('[workload]\nprogram = "tour"\n[track]\nranges = "0x400"\n', "track.ranges: must be a list"),
    ('[workload]\nprogram = "tour"\n[track]\nranges = ["zz"]\n', "track.ranges[0]: 'zz': expected GFN"),
    ('[workload]\nprogram = "tour"\n[track]\nranges = [1, "0x9000"]\n', "track.ranges[1]: 0x9000-0x9000 is not inside one memslot"),
    ('[workload]\nprogram = "tour"\n[track]\nranges = ["0x1f0-0x410"]\n', "track.ranges[0]: 0x1f0-0x410 is not inside"),
    ('[workload]\nprogram = "tour"\n[track]\nrange = []\n', "track.range: unknown key"),
    ('[workload]\nprogram = "tour"\n[dirty_log]\nmode = "nope"\n', "dirty_log.mode: must be one of bitmap"),
    ('[vm]\npaging = "shadow"\n[workload]\nprogram = "tour"\n[dirty_log]\nmode = "pml"\n',
     'dirty_log.mode: pml needs vm.paging = "tdp"'),
    ('[workload]\nprogram = "tour"\n[plugins]\nenable = ["nope"]\n', "plugins.enable: no installed plugin 'nope'"),
    ('[workload]\nprogram = "tour"\n[plugins]\nenable = "dirty_log"\n', "plugins.enable: must be a list of plugin names"),
    ('[workload]\nprogram = "tour"\n[plugins]\ndisable = ["dirty_log"]\n', "plugins.disable: dirty_log cannot be disabled"),
    ('[workload]\nprogram = "tour"\n[plugins]\ndisable = ["shadow_mmu"]\n', "plugins.disable: shadow_mmu cannot be disabled"),
    ('[workload]\nprogram = "tour"\n[plugins.options.nope]\nx = 1\n', "plugins.options.nope: no installed plugin 'nope'"),
    ('[workload]\nprogram = "tour"\n[plugins.options]\ndirty_log = 3\n', "plugins.options.dirty_log: must be a table"),
    ('[workload]\nprogram = "tour"\n[plugins.options.dirty_log]\nmode = "ring"\n',
     "plugins.options.dirty_log.mode: set the mode with dirty_log.mode"),
    ('[workload]\nprogram = "tour"\n[plugins.options.dirty_log]\nring_size = 100\n',
     "plugins.options.dirty_log.ring_size: must be a power of two between 256 and 65536"),
    ('[workload]\nprogram = "tour"\n[plugins.options.dirty_log]\npml = 1\n', "plugins.options.dirty_log.pml: must be true or false"),
    ('[workload]\nprogram = "tour"\n[plugins.options.dirty_log]\nrings = 1\n', "plugins.options.dirty_log.rings: unknown key"),
    ('[workload]\nprogram = "tour"\n[plugins.options.gvt_shadow_gtt]\nbogus = 1\n',
     "plugins.options.gvt_shadow_gtt: unknown option(s) bogus"),
    ('[workload]\nprogram = "tour"\n[plugins.options.gvt_shadow_gtt]\nbacking = "2m"\n',
     "plugins.options.gvt_shadow_gtt.backing: backing must be '4k' or 'huge'"),
    ('[workload]\nprogram = "tour"\n[output]\naudit_level = "trace"\n', "output.audit_level: must be one of info, debug"),
    ('[workload]\nprogram = "tour"\n[output]\njson = 3\n', "output.json: must be a string"),
    ('[workload]\nprogram = "tour"\n[output]\njson = " "\n', "output.json: must be a file path"),
    ('[workload]\nprogram = "tour"\n[output]\nlog = "x"\n', "output.log: unknown key"),
    ('[workload\nprogram = "tour"\n', "s.toml: not valid TOML"),
]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def assert_one_line_exit_2(args: list[str], expected: str, *, report: bool = False) -> None:
    """Exit 2, one line on stderr naming the problem; nothing on stdout unless a ``report`` came first."""
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, (args, r.output, r.exception)
    assert isinstance(r.exception, SystemExit), r.exception  # not an uncaught exception
    assert bool(r.stdout) == report, r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("pagetrack: ") and expected in lines[0], lines[0]


@pytest.mark.parametrize(("args", "expected"), COMMANDS, ids=[" ".join(a) or "-" for a, _ in COMMANDS])
def test_command(workdir: Path, args: list[str], expected: str) -> None:
    assert_one_line_exit_2(args, expected)


@pytest.mark.parametrize(("text", "expected"), SCENARIOS, ids=[e for _, e in SCENARIOS])
def test_scenario_file(workdir: Path, text: str, expected: str) -> None:
    (workdir / "s.toml").write_text(text)
    assert_one_line_exit_2(["run", "s.toml"], expected if expected.startswith("s.toml") else f"s.toml: {expected}")


@pytest.mark.parametrize("args", [["run", "fault.s"], ["run", "fault.toml"]])
def test_a_guest_that_stops_on_an_error(workdir: Path, args: list[str]) -> None:
    """The run's report is printed, then the error: one line on stderr, exit 2."""
    assert_one_line_exit_2(args, "guest stopped: ", report=True)


def test_scenario_that_is_not_utf8(workdir: Path) -> None:
    (workdir / "s.toml").write_bytes(b"name = '\xff'\n")
    assert_one_line_exit_2(["run", "s.toml"], "s.toml: not UTF-8 text")


def test_compare_without_a_usable_kvm(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing prerequisite (/dev/kvm) is exit 2 too."""
    from pagetrack.kvm.vm import Kvm

    monkeypatch.setattr(Kvm.__init__, "__defaults__", ("/nonexistent/kvm",))
    assert_one_line_exit_2(["compare", "ok.s"], "cannot open /nonexistent/kvm")
    assert_one_line_exit_2(["run", "ok.s", "--backend", "kvm"], "cannot open /nonexistent/kvm")


def test_new_plugin_leaves_nothing_behind_on_bad_input(workdir: Path) -> None:
    before = sorted(p.name for p in workdir.iterdir())
    CliRunner().invoke(main, ["new-plugin", "class"])
    CliRunner().invoke(main, ["new-plugin", "fresh", "a-file"])
    assert sorted(p.name for p in workdir.iterdir()) == before


@pytest.mark.parametrize("args", [["run", "s.toml"], ["new-plugin", "9lives"], ["audit", "notlog.jsonl"],
                                  ["run", "--shadow"], ["compare", "ok.s", "--initially-set"]])
def test_a_real_process_prints_no_traceback(workdir: Path, args: list[str]) -> None:
    (workdir / "s.toml").write_text('[vm]\nmemory_mib = 0\n[workload]\nprogram = "tour"\n')
    r = subprocess.run([sys.executable, "-m", "pagetrack", *args], cwd=workdir, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
