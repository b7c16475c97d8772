"""[sync] robust and trim: how a reducer sums the senders' parts (node/swarm/exact.robust_sum), checked like
every other manifest field (file, field, value, allowed range; exit 2), and out of the swarm id unless used."""

from __future__ import annotations

import dataclasses

import pytest

from node.manifest import ManifestError, SyncSection, dump_manifest, parse_manifest


def _raw(**sync):
    return {"swarm": {"name": "x"}, "base": {"model": "m", "fingerprint": "0" * 64},
            "data": {"source": "d", "digest": "e"}, "sync": dict(sync)}


def test_trimmed_is_opt_in_and_the_trim_reaches_the_reducer_only_then():
    m = parse_manifest(_raw())
    assert (m.sync.robust, m.sync.trim, m.sync.reducer_trim) == ("clip", 0.1, 0.0)
    m = parse_manifest(_raw(robust="trimmed", trim=0.25))
    assert (m.sync.robust, m.sync.trim, m.sync.reducer_trim) == ("trimmed", 0.25, 0.25)
    assert parse_manifest(_raw(robust="clip", trim=0.3)).sync.reducer_trim == 0.0


def test_clip_only_manifests_keep_their_swarm_id_and_a_trimmed_one_differs():
    """Manifests written before the option render and hash as they did; trimmed (and its trim) is part of
    the id, so nodes summing differently never average together."""
    plain = parse_manifest(_raw())
    assert "robust" not in plain.to_dict()["sync"] and "trim" not in dump_manifest(plain)
    assert parse_manifest(_raw(robust="clip", trim=0.3)).swarm_id == plain.swarm_id
    trimmed = parse_manifest(_raw(robust="trimmed"))
    other = parse_manifest(_raw(robust="trimmed", trim=0.2))
    assert len({plain.swarm_id, trimmed.swarm_id, other.swarm_id}) == 3
    import tomllib

    again = parse_manifest(tomllib.loads(dump_manifest(other)))
    assert again.sync == other.sync and again.swarm_id == other.swarm_id


@pytest.mark.parametrize("trim", [0.0, -0.1, 0.5, 0.9])
def test_trim_out_of_range_names_file_field_value_and_range(trim):
    with pytest.raises(ManifestError) as err:
        parse_manifest(_raw(robust="trimmed", trim=trim), where="my.toml")
    msg = str(err.value)
    assert msg.startswith("my.toml: ") and f"[sync] trim = {trim!r}" in msg and "(allowed: (0, 0.5)" in msg, msg
    assert err.value.field == "sync.trim"


def test_a_nan_trim_is_refused_when_read():
    with pytest.raises(ManifestError, match=r"\[sync\]\.trim: expected a finite number, got nan"):
        parse_manifest(_raw(robust="trimmed", trim=float("nan")))


def test_an_unknown_robust_sum_names_the_choices():
    with pytest.raises(ManifestError, match=r"\[sync\] robust = 'median' must be one of clip, trimmed") as err:
        parse_manifest(_raw(robust="median"))
    assert err.value.field == "sync.robust"


def test_a_bad_trim_stops_the_command_with_exit_2(tmp_path, capsys):
    import tomli_w

    from node.cli import main

    path = tmp_path / "swarm.toml"
    path.write_text(tomli_w.dumps(_raw(robust="trimmed", trim=0.5)))
    assert main(["swarm", "status", "--manifest", str(path), "--initial-peers", "/ip4/127.0.0.1/tcp/1"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "[sync] trim = 0.5" in err and "(allowed: (0, 0.5)" in err and "Traceback" not in err, err


def test_the_section_defaults_are_the_documented_ones():
    fields = {f.name: f.default for f in dataclasses.fields(SyncSection)}
    assert (fields["robust"], fields["trim"]) == ("clip", 0.1)
