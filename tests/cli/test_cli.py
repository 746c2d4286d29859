"""`relay check` run in-process through relay.cli.main, and relay.config.parse on its own."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.cli import commands
from relay.config import model as config
from relay.rules import REGISTRY
from relay.rules.remove import Remove
from relay.rules.set import SetField

RULE_TYPES = ", ".join(sorted(REGISTRY))
ERROR_LINE = re.compile(r"^(?P<file>.+?):(?P<line>[1-9][0-9]*): (?P<path>\S+): (?P<message>.+)$")

VALID = """\
listen: "127.0.0.1:9100"
storage:
  path: /tmp/relay-cli-test.db
  synchronous: normal
write_keys: [WK1, WK2]
shutdown_grace_seconds: 2
upstreams:
  - name: seg
    kind: segment
    url: http://127.0.0.1:9101
  - name: june
    kind: june
    url: https://june.example.com
    write_key: JK
rules:
  - type: set
    path: context.app.name
    value: web
  - type: remove
    id: strip-password
    paths: [properties.password]
"""

# Each problem sits on the line given in the expected messages of the test using it.
BROKEN = """\
lisen: "127.0.0.1:9100"
storage:
  path: /tmp/relay-cli-test.db
shutdown_grace_seconds: soon
upstreams:
  - name: a
    kind: segmnet
    url: http://127.0.0.1:9101
  - name: b
    kind: segment
  - name: c
    kind: june
    url: http://127.0.0.1:9102
    url: http://127.0.0.1:9103
rules:
  - type: sett
    path: context.app.name
    value: web
"""


def write(tmp_path: Path, text: str, name: str = "relay.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def run_check(path: Path | str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[str]]:
    """relay check on `path`: exit code, stdout, stderr lines."""
    code = commands.main(["check", "--config", str(path)])
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def test_check_valid_file_prints_ok(tmp_path, capsys):
    """A valid file exits 0 with one `file: ok (N upstream(s), M rule(s))` line and no stderr."""
    path = write(tmp_path, VALID)
    code, out, err = run_check(path, capsys)
    assert code == 0
    assert out == f"{path}: ok (2 upstream(s), 2 rule(s))\n"
    assert err == []


def test_check_reports_every_error_at_once_with_its_line(tmp_path, capsys):
    """Every problem of a broken file is printed at once as `file:line: path: message`."""
    path = write(tmp_path, BROKEN)
    code, out, err = run_check(path, capsys)
    assert code == commands.EXIT_CONFIG == 2
    assert out == ""
    assert err == [
        f"{path}:1: lisen: unknown key (did you mean 'listen'?)",
        f"{path}:4: shutdown_grace_seconds: must be a number, got str 'soon'",
        f"{path}:7: upstreams[0].kind: must be one of segment, june, rudderstack;"
        " got 'segmnet' (did you mean 'segment'?)",
        f"{path}:9: upstreams[1]: missing required key 'url'",
        f"{path}:14: upstreams[2].url: duplicate key (first set on line 13)",
        f"{path}:16: rules[0].type: unknown rule type 'sett' (did you mean 'set'?)",
    ]
    for line in err:
        match = ERROR_LINE.match(line)
        assert match is not None, line
        assert match["file"] == str(path)


def test_check_reports_value_errors_alongside_type_errors(tmp_path, capsys):
    """Out-of-range values are reported in the same run as type errors elsewhere in the file."""
    path = write(tmp_path, textwrap.dedent("""\
        listen: "8080"
        shutdown_grace_seconds: soon
        upstreams:
          - name: a
            kind: segmnet
            url: http://127.0.0.1:9101
            max_batch_messages: 0
        """))
    code, _, err = run_check(path, capsys)
    assert code == 2
    assert err == [
        f"{path}:1: listen: must be host:port, like 0.0.0.0:8080; got '8080'",
        f"{path}:2: shutdown_grace_seconds: must be a number, got str 'soon'",
        f"{path}:5: upstreams[0].kind: must be one of segment, june, rudderstack;"
        " got 'segmnet' (did you mean 'segment'?)",
        f"{path}:7: upstreams[0].max_batch_messages: must be from 1 to 2500; got 0",
    ]


def test_check_reports_value_checks_at_their_lines(tmp_path, capsys):
    """Checks made after typing (url, batch limits, names, rule fields) name their own line."""
    path = write(tmp_path, textwrap.dedent("""\
        upstreams:
          - name: a
            kind: segment
            url: http://127.0.0.1:9101
          - name: a
            kind: june
            url: ftp://127.0.0.1:9102
          - name: c
            kind: june
            url: http://127.0.0.1:9103
            max_batch_bytes: 100
        rules:
          - path: context.app.name
          - type: set
            id: x
            path: a..b
            value: 1
          - type: remove
            id: x
            paths: [b]
        """))
    code, _, err = run_check(path, capsys)
    assert code == 2
    assert err == [
        f"{path}:5: upstreams[1].name: another upstream is named 'a'",
        f"{path}:7: upstreams[1].url: must be an http:// or https:// URL, like"
        " https://api.segment.io; got 'ftp://127.0.0.1:9102'",
        f"{path}:11: upstreams[2].max_batch_bytes: must be from 1024 to 500000; got 100",
        f"{path}:13: rules[0]: each rule needs a 'type': one of {RULE_TYPES}",
        f"{path}:16: rules[1].path: must be a dotted path like a.b.c; got 'a..b'",
        f"{path}:19: rules[2].id: another rule has the id 'x'",
    ]


def test_check_reports_duplicate_upstream_names(tmp_path, capsys):
    """Two upstreams with one name are an error at the second one's name line."""
    path = write(tmp_path, textwrap.dedent("""\
        upstreams:
          - name: a
            kind: segment
            url: http://127.0.0.1:9101
          - name: a
            kind: june
            url: http://127.0.0.1:9102
        """))
    code, _, err = run_check(path, capsys)
    assert code == 2
    assert err == [f"{path}:5: upstreams[1].name: another upstream is named 'a'"]


def test_check_expands_environment_variables(tmp_path, capsys, monkeypatch):
    """`${VAR}` takes the variable's value, `${VAR:-default}` the default when VAR is unset."""
    monkeypatch.setenv("RELAY_T_URL", "http://127.0.0.1:9201")
    monkeypatch.setenv("RELAY_T_KEY", "KEY-FROM-ENV")
    monkeypatch.setenv("RELAY_T_DB", str(tmp_path / "from-env.db"))
    monkeypatch.delenv("RELAY_T_LISTEN", raising=False)
    monkeypatch.delenv("RELAY_T_GRACE", raising=False)
    path = write(tmp_path, textwrap.dedent("""\
        listen: "${RELAY_T_LISTEN:-127.0.0.1:9200}"
        storage:
          path: "${RELAY_T_DB:-data/never.db}"
        shutdown_grace_seconds: ${RELAY_T_GRACE:-3}
        upstreams:
          - name: seg
            kind: segment
            url: "${RELAY_T_URL}"
            write_key: "pre-${RELAY_T_KEY}-post"
        """))
    code, out, err = run_check(path, capsys)
    assert (code, out, err) == (0, f"{path}: ok (1 upstream(s), 0 rule(s))\n", [])
    loaded = config.load(str(path))
    assert loaded.listen == "127.0.0.1:9200"
    assert loaded.storage.path == str(tmp_path / "from-env.db")
    assert loaded.shutdown_grace_seconds == 3.0
    assert loaded.upstreams[0].url == "http://127.0.0.1:9201"
    assert loaded.upstreams[0].write_key == "pre-KEY-FROM-ENV-post"

    monkeypatch.setenv("RELAY_T_LISTEN", "127.0.0.1:9300")
    monkeypatch.setenv("RELAY_T_GRACE", "7")
    loaded = config.load(str(path))
    assert loaded.listen == "127.0.0.1:9300"
    assert loaded.shutdown_grace_seconds == 7.0


def test_check_reports_unset_variable_at_its_line(tmp_path, capsys, monkeypatch):
    """An unset `${VAR}` without a default is an error naming the variable, at its line."""
    monkeypatch.delenv("RELAY_T_MISSING", raising=False)
    monkeypatch.delenv("RELAY_T_ALSO_MISSING", raising=False)
    path = write(tmp_path, textwrap.dedent("""\
        listen: "127.0.0.1:9200"
        upstreams:
          - name: seg
            kind: segment
            url: http://127.0.0.1:9201
            write_key: "${RELAY_T_MISSING}"
        write_keys: ["${RELAY_T_ALSO_MISSING}"]
        """))
    code, out, err = run_check(path, capsys)
    assert code == 2
    assert out == ""
    assert err == [
        f"{path}:6: upstreams[0].write_key: environment variable RELAY_T_MISSING is not set"
        " (write ${RELAY_T_MISSING:-} to allow empty)",
        f"{path}:7: write_keys[0]: environment variable RELAY_T_ALSO_MISSING is not set"
        " (write ${RELAY_T_ALSO_MISSING:-} to allow empty)",
    ]


def test_unquoted_variable_that_is_not_a_yaml_scalar_stays_a_string(tmp_path, capsys,
                                                                    monkeypatch):
    """An unquoted `${VAR}` whose value is no YAML scalar is taken as the string it is."""
    monkeypatch.setenv("RELAY_T_KEY", "a: b: c")
    path = write(tmp_path, textwrap.dedent("""\
        upstreams:
          - name: seg
            kind: segment
            url: http://127.0.0.1:9201
            write_key: ${RELAY_T_KEY}
        """))
    code, _, err = run_check(path, capsys)
    assert (code, err) == (0, [])
    assert config.load(str(path)).upstreams[0].write_key == "a: b: c"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("upstreams:\n  - name: a\n   kind: segment\n",
         "3: (yaml): expected <block end>, but found '<block mapping start>'"),
        ('upstreams: [{name: a, kind: segment, url: "http://x"}]\nlisten: [1\n',
         "3: (yaml): expected ',' or ']', but got '<stream end>'"),
        ("listen: 127.0.0.1:1\nupstreams:\n\t- name: a\n",
         "3: (yaml): found character '\\t' that cannot start any token"),
    ],
    ids=["indentation", "unclosed-list", "tab"],
)
def test_check_reports_yaml_syntax_error_with_line(tmp_path, capsys, text, expected):
    """A YAML syntax error is one `file:line: (yaml): problem` line and exit 2."""
    path = write(tmp_path, text)
    code, out, err = run_check(path, capsys)
    assert code == 2
    assert out == ""
    assert err == [f"{path}:{expected}"]


def test_check_missing_file(tmp_path, capsys):
    """A config file that does not exist is reported as `file:1: (file): cannot read: ...`."""
    path = tmp_path / "nope.yaml"
    code, out, err = run_check(path, capsys)
    assert code == 2
    assert out == ""
    assert err == [f"{path}:1: (file): cannot read: No such file or directory"]


def test_check_uses_relay_config_variable(tmp_path, capsys, monkeypatch):
    """Without --config, `relay check` reads the file named by $RELAY_CONFIG."""
    path = write(tmp_path, VALID, "from-env.yaml")
    monkeypatch.setenv("RELAY_CONFIG", str(path))
    code = commands.main(["check"])
    out, err = capsys.readouterr()
    assert (code, out, err) == (0, f"{path}: ok (2 upstream(s), 2 rule(s))\n", "")


def test_no_command_prints_help_and_exits_2(capsys):
    """`relay` with no sub-command prints usage naming both commands and exits 2."""
    code = commands.main([])
    out, _ = capsys.readouterr()
    assert code == 2
    assert out.startswith("usage: relay")
    assert "serve" in out
    assert "check" in out


def test_parse_builds_frozen_dataclasses_with_defaults():
    """parse fills every option left out with its default and returns frozen dataclasses."""
    text = "upstreams:\n  - name: seg\n    kind: segment\n    url: http://127.0.0.1:9\n"
    loaded = config.parse("mem.yaml", text, env={})
    assert loaded == config.Config(
        upstreams=(config.Upstream(name="seg", kind="segment", url="http://127.0.0.1:9"),),
        file="mem.yaml",
    )
    assert loaded.listen == "0.0.0.0:8080"
    assert (loaded.host, loaded.port) == ("0.0.0.0", 8080)
    assert loaded.storage == config.Storage(path="data/relay.db", synchronous="full",
                                            cache_size=100_000)
    assert loaded.write_keys == ()
    assert loaded.shutdown_grace_seconds == 5.0
    assert loaded.on_rule_error == "pass"
    assert loaded.rules == ()
    assert loaded.warnings == ()
    up = loaded.upstreams[0]
    assert (up.write_key, up.timeout_seconds, up.max_batch_messages, up.max_batch_bytes) == (
        "", 10.0, 500, 500_000)
    assert (up.backoff_initial_seconds, up.backoff_max_seconds, up.pause_seconds) == (
        0.5, 60.0, 60.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.listen = "127.0.0.1:1"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.storage.path = "elsewhere.db"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        up.url = "http://elsewhere"  # type: ignore[misc]


def test_parse_converts_values_and_builds_rules():
    """Integers become floats where a number is expected, lists tuples, and rules ordered Steps."""
    loaded = config.parse("valid.yaml", VALID, env={})
    assert loaded.listen == "127.0.0.1:9100"
    assert (loaded.host, loaded.port) == ("127.0.0.1", 9100)
    assert loaded.storage == config.Storage("/tmp/relay-cli-test.db", "normal")
    assert loaded.write_keys == ("WK1", "WK2")
    assert loaded.shutdown_grace_seconds == 2.0
    assert isinstance(loaded.shutdown_grace_seconds, float)
    assert [u.name for u in loaded.upstreams] == ["seg", "june"]
    assert loaded.upstreams[1].kind == "june"
    assert loaded.upstreams[1].write_key == "JK"
    assert [s.id for s in loaded.rules] == ["set#0", "strip-password"]
    assert loaded.rules[0].rule == SetField(path="context.app.name", value="web")
    assert loaded.rules[1].rule == Remove(paths=("properties.password",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.rules[0].id = "other"  # type: ignore[misc]


def test_parse_raises_config_error_listing_every_problem():
    """parse raises ConfigError whose `errors` are the same lines `relay check` prints."""
    with pytest.raises(config.ConfigError) as info:
        config.parse("mem.yaml", BROKEN, env={})
    assert info.value.errors == [
        "mem.yaml:1: lisen: unknown key (did you mean 'listen'?)",
        "mem.yaml:4: shutdown_grace_seconds: must be a number, got str 'soon'",
        "mem.yaml:7: upstreams[0].kind: must be one of segment, june, rudderstack;"
        " got 'segmnet' (did you mean 'segment'?)",
        "mem.yaml:9: upstreams[1]: missing required key 'url'",
        "mem.yaml:14: upstreams[2].url: duplicate key (first set on line 13)",
        "mem.yaml:16: rules[0].type: unknown rule type 'sett' (did you mean 'set'?)",
    ]
    assert str(info.value) == "\n".join(info.value.errors)


def test_parse_uses_given_environment_mapping():
    """parse expands variables from the mapping it is given; an empty value takes the default."""
    text = ('listen: "${L:-127.0.0.1:1}"\nupstreams:\n  - name: s\n    kind: segment\n'
            '    url: "${U}"\n')
    loaded = config.parse("mem.yaml", text, env={"U": "http://127.0.0.1:5", "L": "127.0.0.1:6"})
    assert loaded.listen == "127.0.0.1:6"
    assert loaded.upstreams[0].url == "http://127.0.0.1:5"
    loaded = config.parse("mem.yaml", text, env={"U": "http://127.0.0.1:5", "L": ""})
    assert loaded.listen == "127.0.0.1:1"
    with pytest.raises(config.ConfigError) as info:
        config.parse("mem.yaml", text, env={"L": "127.0.0.1:6"})
    assert info.value.errors[0] == (
        "mem.yaml:5: upstreams[0].url: environment variable U is not set"
        " (write ${U:-} to allow empty)"
    )


def test_an_empty_or_blank_key_or_token_is_an_error_that_shows_no_secret(tmp_path, capsys):
    """`write_keys: ["${RELAY_WRITE_KEY}"]` with the variable set but empty would accept requests
    with no key at all: it is a config error, as are blank write keys, a blank upstream key and
    a blank (or short) admin token; the token's value is never printed."""
    path = write(tmp_path, textwrap.dedent("""\
        upstreams:
          - name: seg
            kind: segment
            url: http://127.0.0.1:9201
            write_key: "   "
        write_keys: ["${RELAY_T_EMPTY_KEY}", "ok-key"]
        admin:
          token: "secret-but-short"
        """).replace("secret-but-short", " " * 8 + "x" * 12))
    try:
        config.load(str(path), env={"RELAY_T_EMPTY_KEY": ""})
    except config.ConfigError as exc:
        errors = exc.errors
    else:
        pytest.fail("an empty write key was accepted")
    assert [e.split(": ", 2)[1] for e in errors] == [
        "upstreams[0].write_key", "write_keys", "admin.token"]
    assert "entry 0 is empty, which would let in requests with no key" in errors[1]
    assert "xxxx" not in "\n".join(errors)
    with pytest.raises(config.ConfigError, match="has a space at one end"):
        config.parse("x.yaml", 'upstreams: [{name: a, kind: segment, url: "http://h"}]\n'
                     'write_keys: ["k", " k2"]\n')


@settings(max_examples=1000, deadline=None)
@given(text=st.text(max_size=400) | st.builds(
    lambda a, b: a + b,
    st.sampled_from([VALID, BROKEN, "x: &r [*r]\n", "a: &a [1,2]\nb: [*a, *a]\n"]),
    st.text(alphabet="&*[]{}:,!-?|>'\"\n #%@`\t\\", max_size=60)))
def test_any_text_is_a_config_or_config_errors_never_an_exception(text):
    """Whatever a config file holds, loading it gives a Config or a ConfigError whose errors all
    point at `file:line`: never another exception (a reload must survive any file)."""
    try:
        config.parse("any.yaml", text, env={})
    except config.ConfigError as exc:
        assert exc.errors
        assert all(re.match(r"any\.yaml:[1-9][0-9]*: \S", line) and "\n" not in line
                   for line in exc.errors), exc.errors


def test_an_upstream_url_ending_in_the_batch_path_is_refused_and_another_path_warned(
        tmp_path, capsys):
    """`url: http://host/sdk/batch` (June's batch path, which relay adds itself) is an error at
    its line naming the base URL; any other path loads with a warning at its line."""
    text = ("upstreams:\n  - name: june\n    kind: june\n    url: http://127.0.0.1:9/sdk/batch/\n"
            "  - name: seg\n    kind: segment\n    url: http://127.0.0.1:9/proxy\n")
    code, _, err = run_check(write(tmp_path, text), capsys)
    assert code == 2
    assert err == [f"{tmp_path / 'relay.yaml'}:4: upstreams[0].url: ends with /sdk/batch, which"
                   " relay adds: give the vendor's base URL, like http://127.0.0.1:9"]
    text = text.replace("/sdk/batch/", "")
    code, _, err = run_check(write(tmp_path, text), capsys)
    assert code == 0
    assert err == [f"{tmp_path / 'relay.yaml'}:7: upstreams[1].url: warning: it has a path"
                   " (/proxy); batches go to /proxy/v1/batch. Most vendors take the base URL"
                   " alone"]


def test_the_shipped_staff_rule_warns_while_its_domain_is_the_placeholder(capsys, monkeypatch):
    """config/relay.yaml with RELAY_STAFF_DOMAIN unset filters on `your.domain`: `relay check`
    says so at the rule's line; with the variable set it says nothing."""
    monkeypatch.delenv("RELAY_STAFF_DOMAIN", raising=False)
    code, _, err = run_check("config/relay.yaml", capsys)
    assert code == 0
    assert len(err) == 1 and "'your.domain' is a placeholder" in err[0]
    assert err[0].startswith("config/relay.yaml:") and "rules[1].email_domains" in err[0]
    monkeypatch.setenv("RELAY_STAFF_DOMAIN", "acme.io")
    assert run_check("config/relay.yaml", capsys)[2] == []


def test_version(capsys):
    """`relay --version` prints the installed version and exits 0."""
    with pytest.raises(SystemExit) as exited:
        commands.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"relay {importlib.metadata.version('relay')}"
