"""Link specs: ``UP/DOWN/RTT``, trace files (three layouts), inline tables."""

from __future__ import annotations

import json
import math
import re

import pytest

from tandem.clients.node import NodeConfig
from tandem.config import ConfigError
from tandem.network import (
    PRESETS,
    LinkProfile,
    Trace,
    TraceError,
    assign_links,
    encode_link,
    link_label,
    load_link_trace,
    parse_link,
    parse_rates,
    preset,
    variable_link,
)


def test_rates_spec_in_every_unit():
    assert parse_rates("2mbit/8mbit/120ms") == (2.0, 8.0, pytest.approx(0.120))
    assert parse_rates("500kbit/1gbit/1s") == (0.5, 1000.0, 1.0)
    assert parse_rates(" 1.5 Mbit / 3e1mbit / 0ms ") == (1.5, 30.0, 0.0)


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("2mbit/8mbit", "expected UP/DOWN/RTT"),
        ("2mb/8mbit/10ms", "uplink '2mb'"),
        ("2mbit/8mbit/10", "RTT '10'"),
        ("0mbit/8mbit/10ms", "must be > 0"),
    ],
)
def test_bad_rates_spec_says_what_is_wrong(spec, why):
    with pytest.raises(ValueError, match=why):
        parse_link(spec)


def test_rates_link_times_a_message_by_hand():
    link = parse_link("2mbit/8mbit/120ms")
    assert link.name == "2mbit/8mbit/120ms"
    # 250 kB up at 2 Mbit/s = 1 s, plus RTT/2 = 0.06 s
    assert link.one_way_seconds("up", 250_000, 0.0) == pytest.approx(1.06)
    assert link.one_way_seconds("down", 250_000, 0.0) == pytest.approx(0.31)


def test_four_column_trace_with_header_in_any_order(tmp_path):
    path = tmp_path / "link.csv"
    path.write_text("rtt_ms,time_s,down_mbps,up_mbps\n100,0,8,2\n# x\n50,10,4,1\n")
    link = parse_link(f"trace:{path}")
    assert link.up.values == (2.0, 1.0) and link.down.values == (8.0, 4.0)
    assert link.rtt.values == pytest.approx((0.1, 0.05))
    assert link.up.period == 20.0 and link.up.at(25.0) == 2.0
    headerless = tmp_path / "plain.csv"
    headerless.write_text("0,2,8,100\n10,1,4,50\n")
    assert parse_link(f"trace:{headerless}").up == link.up


def test_two_column_and_fedscale_traces(tmp_path):
    two = tmp_path / "bw.csv"
    two.write_text("time_s,mbps\n0,10\n1,20\n")
    link = parse_link(f"trace:{two}")
    assert link.up is link.down and link.up.values == (10.0, 20.0)
    assert link.rtt.at(0) == 0.0
    caps = tmp_path / "caps.json"
    caps.write_text(
        json.dumps(
            {
                "a": {"computation": 1, "communication": 2000},
                "b": {"computation": 1, "communication": 500},
            }
        )
    )
    assert parse_link(f"trace:{caps}#b").up.at(0) == pytest.approx(0.5)
    links = assign_links([5, 6, 7], f"trace:{caps}")  # one client per node, cycling
    assert [links[n].up.at(0) for n in (5, 6, 7)] == pytest.approx([2.0, 0.5, 2.0])
    with pytest.raises(TraceError, match="no client 'zz'"):
        parse_link(f"trace:{caps}#zz")


def test_bad_trace_files_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("time,up,down,rtt\n0,1,1,10\n5,x,1,10\n")
    with pytest.raises(TraceError, match=r"bad\.csv:3: not numbers"):
        parse_link(f"trace:{bad}")
    with pytest.raises(TraceError, match=r"missing\.csv"):
        parse_link(f"trace:{tmp_path / 'missing.csv'}")
    three = tmp_path / "three.csv"
    three.write_text("0,1,2\n")
    with pytest.raises(TraceError, match="expected 'time_s,up_mbps"):
        parse_link(f"trace:{three}")


def test_inline_table_round_trips(tmp_path):
    path = tmp_path / "link.csv"
    path.write_text("0,2,8,100\n10,1,4,50\n")
    link = parse_link(f"trace:{path}")
    spec = encode_link(link)
    assert spec == "table:0,2,8,100;10,1,4,50"
    again = parse_link(spec)
    assert (again.up, again.down, again.rtt) == (link.up, link.down, link.rtt)
    assert again.name == spec and link_label(spec) == "trace (2 steps)"
    assert encode_link(PRESETS["4g"]) == "table:0,50,50,30"


def test_mix_members_are_checked_and_custom_specs_mix():
    links = assign_links([1, 2, 3, 4], "mix:4g,2mbit/8mbit/120ms", seed=3)
    assert {link.name for link in links.values()} <= {"4g", "2mbit/8mbit/120ms"}
    with pytest.raises(ValueError, match="unknown link profile '3g'"):
        assign_links([1], "mix:4g,3g")


def test_a_node_declares_rates_or_a_trace_inline(tmp_path):
    node = NodeConfig.from_node_config(
        {"partition-id": 0, "num-partitions": 1, "link-profile": "2mbit/8mbit/120ms"}
    )
    assert node.link == "2mbit/8mbit/120ms"
    path = tmp_path / "link.csv"
    path.write_text("time_s,up_mbps,down_mbps,rtt_ms\n0,2,8,120\n30,1,4,200\n")
    node = NodeConfig.from_node_config(
        {"partition-id": 0, "num-partitions": 1, "link-trace": str(path)}
    )
    assert node.link == "table:0,2,8,120;30,1,4,200"
    with pytest.raises(ConfigError, match="link-profile"):
        NodeConfig.from_node_config(
            {"partition-id": 0, "num-partitions": 1, "link-profile": "mix:4g,5g"}
        )
    with pytest.raises(ConfigError, match="link-trace"):
        NodeConfig.from_node_config(
            {"partition-id": 0, "num-partitions": 1, "link-trace": "/nonexistent"}
        )


def test_acesync_budgets_follow_a_declared_rates_or_trace_link():
    from flwr.serverapp.strategy import FedAvg

    from tandem.protocol.acesync import AceSyncOptions
    from tandem.strategies.acesync import AceSync

    policy = AceSync(FedAvg(), options=AceSyncOptions(link="4g"), local_steps=5)
    policy._ensure_links([1, 2])
    assert policy.bandwidth_mbps(1) == 50.0
    policy._declared(1, "2mbit/8mbit/120ms")
    policy._declared(2, "table:0,3,9,80;5,1,9,80")
    assert policy.bandwidth_mbps(1) == 2.0  # eq. 5's B_k starts from the link
    assert policy.bandwidth_mbps(2) == 3.0
    assert policy.links[2].up.at(6.0) == 1.0 and policy.links[2].rtt.at(0) == 0.08
    estimator = policy.estimators[1]
    policy._declared(1, "2mbit/8mbit/120ms")  # the same link again: kept as is
    assert policy.estimators[1] is estimator


def test_acesync_sends_less_on_a_slower_custom_link(tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity
    from inprocess import run_inprocess

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    config = {
        "method": "acesync",
        "mnist1d-samples": 600,
        "local-steps": 5,
        "num-server-rounds": 1,
        "acesync-clusters": 1,
        "acesync-personalize-rounds": 0,
    }
    up = {}
    for link in ("4g", "2mbit/8mbit/120ms"):
        records, _ = run_inprocess(
            {**config, "acesync-link": link}, nodes=2, out=tmp_path / link[:2]
        )
        plans = [r for r in records if r["event"] == "plan"]
        assert {p["bandwidth-mbps"] for p in plans} == {50.0 if link == "4g" else 2.0}
        up[link] = records[-1]["bytes-up"]
    assert up["2mbit/8mbit/120ms"] < up["4g"]  # eq. 5: a smaller budget


def test_preset_is_parse_link_with_its_seed_and_labels_are_bounded():
    assert preset("variable") == variable_link(0)
    assert preset("variable", 3) == variable_link(3) != variable_link(0)
    assert link_label("x" * 500) == "x" * 200
    assert link_label("2mbit/8mbit/120ms") == "2mbit/8mbit/120ms"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("# only a comment\n\n", r"link\.csv: no rows"),
        ("time,up,down,latency\n0,1,1,1\n", r"link\.csv:1: header \['time', 'up', "),
        ("time,up,down,rtt\n0,1,1,1\n5,1,1\n", r"link\.csv:3: expected 4 columns"),
        ("5,1,1,10\n9,1,1,10\n", r"link\.csv: the first time must be 0, got 5\.0"),
        ("0,1,1,10\n5,-1,1,10\n", r"link\.csv: row .*need finite values, rates >= 0"),
        ("0,1,1,10\n5,1,1,-10\n", r"link\.csv: row .*rates >= 0"),
        ("0,1,1,10\n5,1,1,inf\n", r"link\.csv: row .*need finite"),
        ("0,1,1,10\n0,1,1,10\n", r"link\.csv: times must increase strictly"),
    ],
)
def test_each_malformed_link_trace_is_named(tmp_path, body, why):
    path = tmp_path / "link.csv"
    path.write_text(body)
    with pytest.raises(TraceError, match=why):
        parse_link(f"trace:{path}")


def test_link_trace_rows_comments_blanks_and_period(tmp_path):
    path = tmp_path / "link.csv"
    # spaces in header names, an indented comment, a row of empty cells, a
    # zero rate (allowed: the link stalls)
    path.write_text(
        "time s,up mbps,down mbps,rtt ms\n0,2,8,100\n   # x\n,,,\n"
        "10,0,4,50\n20,1,4,50\n"
    )
    link = parse_link(f"trace:{path}")
    assert link.name == f"trace:{path}"
    assert link.up.times == (0.0, 10.0, 20.0) and link.up.values == (2.0, 0.0, 1.0)
    assert link.rtt.values == pytest.approx((0.1, 0.05, 0.05))
    # the trace repeats after its last step plus the mean step: 20 + 10
    assert link.up.period == link.down.period == link.rtt.period == 30.0
    one = tmp_path / "one.csv"
    one.write_text("0,2,8,100\n")
    assert parse_link(f"trace:{one}").up.period == math.inf


def test_fedscale_csv_is_a_link_trace_too(tmp_path):
    caps = tmp_path / "caps.csv"
    caps.write_text("client_id,computation,communication\nx,1,4000\ny,1,1000\n")
    first = parse_link(f"trace:{caps}")  # index 0: the first client
    assert first.name == f"trace:{caps}#x"
    assert first.up.at(0) == first.down.at(0) == pytest.approx(4.0)
    assert first.rtt == Trace.constant(0.0)
    assert parse_link(f"trace:{caps}", index=3).name == f"trace:{caps}#y"
    assert load_link_trace(caps).name == f"trace:{caps}#x"  # index 0 by default


def test_encode_link_needs_shared_steps_and_repeats_constants():
    steps = Trace((0.0, 5.0), (2.0, 1.0), 10.0)
    link = LinkProfile("mix", steps, Trace.constant(8.0), Trace.constant(0.1))
    assert encode_link(link) == "table:0,2,8,100;5,1,8,100"
    other_times = Trace((0.0, 4.0), (8.0, 4.0), 10.0)
    with pytest.raises(ValueError, match="link 'bad': traces do not share their steps"):
        encode_link(LinkProfile("bad", steps, other_times, Trace.constant(0.1)))
    other_period = Trace((0.0, 5.0), (8.0, 4.0), 12.0)
    with pytest.raises(ValueError, match="do not share their steps"):
        encode_link(LinkProfile("bad", steps, other_period, Trace.constant(0.1)))


def test_rates_spec_messages_name_the_spec_and_the_part():
    # each part's message names the whole spec, the part and its units
    for spec, message in [
        ("2mb/8mbit/10ms", "uplink '2mb' is not a number with a unit "),
        ("2mbit/8/10ms", "downlink '8' is not a number with a unit "),
        ("2mbit/8mbit/10", "RTT '10' is not a number with a unit "),
    ]:
        units = "(ms, s)" if message.startswith("RTT") else "(kbit, mbit, gbit)"
        expected = f"link spec {spec!r}: {message}{units}"
        with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
            parse_rates(spec)
    with pytest.raises(
        ValueError, match=r"^link spec '1mbit/0mbit/10ms': bandwidths must be > 0$"
    ):
        parse_rates("1mbit/0mbit/10ms")
    # a downlink below 1 Mbit/s is fine
    assert parse_rates("1mbit/500kbit/10ms") == (1.0, 0.5, pytest.approx(0.01))


def test_parse_link_messages_seed_and_length_bound(tmp_path):
    assert parse_link("variable") == variable_link(0)  # seed 0 by default
    known = "4g, 5g, lan, wifi, variable"
    expected = (
        f"unknown link profile '3g' (known: {known}; or UP/DOWN/RTT such as "
        "2mbit/8mbit/120ms, or trace:<file>)"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        parse_link("3g")
    # at most 65536 characters: one more is refused before parsing
    with pytest.raises(ValueError, match=r"^unknown link profile 'xxx"):
        parse_link("x" * 65536)
    with pytest.raises(
        ValueError, match=r"^link spec of 65537 characters \(at most 65536\)$"
    ):
        parse_link("x" * 65537)
    # a missing file: the OS's reason alone, not the errno and path again
    spec = f"trace:{tmp_path / 'missing.csv'}"
    with pytest.raises(TraceError) as info:
        parse_link(spec)
    assert str(info.value) == f"link spec {spec!r}: No such file or directory"


def test_inline_table_messages():
    with pytest.raises(
        ValueError,
        match=r"^link spec table row '0,1,2': expected t,up_mbps,down_mbps,rtt_ms$",
    ):
        parse_link("table:0,1,2")
    with pytest.raises(
        ValueError, match=r"^link spec table: the first time must be 0, got 5\.0$"
    ):
        parse_link("table:5,1,1,10")


def test_link_trace_layout_details(tmp_path):
    path = tmp_path / "link.csv"
    where = re.escape(str(path))
    # a two-column trace is named after its file
    path.write_text("0,10\n1,20\n")
    assert parse_link(f"trace:{path}").name == f"trace:{path}"
    # a first row with a number first is data, whatever its other cells
    path.write_text("0,fast,8,100\n")
    with pytest.raises(TraceError, match=rf"^{where}:1: not numbers"):
        load_link_trace(path)
    # a header with an empty name names no column
    path.write_text("time,up,down,\n0,1,1,10\n")
    with pytest.raises(TraceError, match=rf"^{where}:1: header .* must name time"):
        load_link_trace(path)
    # a header and no rows
    path.write_text("time,up,down,rtt\n")
    with pytest.raises(TraceError, match=rf"^{where}: no rows$"):
        load_link_trace(path)


def test_link_option_check_accepts_what_the_run_parses():
    from tandem.network import link_option_check

    check = link_option_check("simultrain-link")
    assert check("4g") is True and check("mix:4g,2mbit/8mbit/120ms") is True
    with pytest.raises(ConfigError) as info:
        check("3g")
    err = info.value
    assert (err.key, err.value) == ("simultrain-link", "3g")
    assert err.rule.startswith("unknown link profile '3g' (known: 4g, 5g")
    assert str(err).startswith("run config 'simultrain-link' = '3g': unknown link")
