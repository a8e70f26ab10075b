"""The cluster view and jobs with real agents on loopback: nodes join, fall silent and come
back; `umig run` passes a job's output and exit status on; `umig top --once` draws the view."""
import json
import shlex

from conftest import free_port, run_umig


def with_args(*args):
    """A prefix that appends options to the agent's command line (the fixture builds the rest)."""
    return ["sh", "-c", 'exec "$@" ' + shlex.join(map(str, args)), "sh"]


def cluster_agent(agent_factory, name, listen, peers, *extra):
    peer_args = [a for p in peers for a in ("--peer", p)]
    return agent_factory(name, listen, prefix=with_args(*peer_args, "--interval", "0.2", "--node-timeout", "1.5",
                                                        *extra))


def nodes(agent):
    r = run_umig("nodes", "--agent", agent.listen, "--json", timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_node_joins_leaves_and_returns(agent_factory):
    a_ep, b_ep = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    a = cluster_agent(agent_factory, "node-a", a_ep, [b_ep])
    b = cluster_agent(agent_factory, "node-b", b_ep, [a_ep])
    a.wait_for_line(r"^node-a: node node-b joined", 30)
    view = nodes(a)
    assert set(view["nodes"]) == {"node-a", "node-b"} and view["local"] == "node-a"
    me = view["nodes"]["node-a"]
    for key in ("runq", "load", "loadavg", "cpu", "cores", "capacity", "mem_free", "mem_total", "processes"):
        assert key in me, f"the sample lacks {key}: {me}"
    assert view["nodes"]["node-b"]["endpoint"] == b_ep

    since = a.mark()
    b.kill()
    a.wait_for_line(r"^node-a: node node-b fell silent", 30, since)
    assert set(nodes(a)["nodes"]) == {"node-a"}

    since = a.mark()
    cluster_agent(agent_factory, "node-b", b_ep, [a_ep])
    a.wait_for_line(r"^node-a: node node-b is back", 30, since)
    assert set(nodes(a)["nodes"]) == {"node-a", "node-b"}


def test_run_passes_output_and_exit_status_on(agent_factory, tmp_path):
    agent = agent_factory("solo")
    r = run_umig("run", "--agent", agent.listen, "--", "sh", "-c", "echo out; echo err >&2; exit 7", timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")
    r = run_umig("run", "--agent", agent.listen, "--", "sh", "-c", "kill -TERM $$", timeout=60)
    assert r.returncode == 128 + 15, r.stderr
    out = tmp_path / "job.out"
    r = run_umig("run", "--agent", agent.listen, "--stdout", out, "--json", "--", "echo", "to a file", timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == "to a file\n"
    assert json.loads(r.stdout)["ended"] == ["status", 0]
    agent.wait_for_line(r"^solo: job solo\.3 \(pid \d+\) exited with status 0", 30)


def test_top_once_shows_nodes_and_jobs(agent_factory, registry):
    agent = cluster_agent(agent_factory, "topnode", f"tcp://127.0.0.1:{free_port()}", [])
    r = run_umig("run", "--agent", agent.listen, "--detach", "--json", "--", "sleep", "60", timeout=60)
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    registry.remember(job["pid"])
    r = run_umig("top", "--agent", agent.listen, "--once", timeout=30)
    assert r.returncode == 0, r.stderr
    assert "topnode" in r.stdout and f"job {job['job']}" in r.stdout and "eligible" in r.stdout, r.stdout
