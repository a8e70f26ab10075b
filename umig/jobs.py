"""Jobs: processes started with `umig run`, the ones the scheduler may move.

`umig run CMD...` asks the local agent to start CMD; the agent is its parent, so the job is
in the agent's node (its cgroup) and the agent reaps it. Its stdin is /dev/null and its stdout
and stderr are files (umig moves no pipes or terminals). The agent where a job was started is
its origin and keeps its record until it ends, wherever it runs meanwhile:

  origin --(migrate, then "adopt" {job, pid, origin, age, ...})--> target
  target --("job-moved" {job, node, pid})--> origin      (when the target is not the origin)
  the agent that reaps it --("job-exit" {job, status or signal})--> origin

A restored process starts with zero CPU time, so the age a job had when it left travels in
"adopt" and is added to what it uses after. Agents send these notes through an Outbox that
repeats each until the receiver acknowledges it: a receiver restoring a migration answers late.
"""
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import psutil
import zmq

from umig.errors import UmigError
from umig.state.signals import describe_end
from umig.transport import Connection, control, endpoint, parse_control

KEEP_FINISHED = 3600.0    # seconds the origin remembers a finished job for `umig run` to collect
KEEP_REAPED = 300.0       # seconds a reaped PID is remembered for an "adopt" that comes late
RESEND_AFTER = 1.0
GIVE_UP_AFTER = 300.0


class Job:
    def __init__(self, id, argv, origin, stdout, stderr, pid=None, node=None, carried_age=0.0, started=None,
                 moved_at=0.0):
        self.id, self.argv, self.origin = id, list(argv), origin
        self.stdout, self.stderr = stdout, stderr
        self.pid, self.node = pid, node
        self.carried_age = carried_age  # CPU seconds used before the process came here
        self.started = started or time.time()
        self.moved_at = moved_at        # when it last arrived somewhere (wall clock), for the guards
        self.state = "running"          # running | migrating | away | exited
        self.ended = None               # ("status", N) or ("signal", N)
        self.ended_at = None            # monotonic, on the origin: when to forget the record
        self.finished = None            # wall clock, where it ended
        self.proc = None                # the Popen, when this agent started it
        self.exit_while_migrating = None  # its end, when it came while a migration was under way

    def record(self):
        return {"job": self.id, "argv": self.argv, "origin": self.origin, "stdout": self.stdout,
                "stderr": self.stderr, "pid": self.pid, "node": self.node, "state": self.state,
                "started": self.started, "ended": list(self.ended) if self.ended else None, "finished": self.finished,
                "carried_age": self.carried_age, "moved_at": self.moved_at}


class Outbox:
    """Notes to other agents, each repeated until acknowledged (receivers are idempotent)."""

    def __init__(self, log):
        self.log = log
        self.sockets = {}
        self.pending = collections.OrderedDict()  # note id -> [endpoint, kind, meta, first, last sent]

    def _socket(self, peer):
        if peer not in self.sockets:
            s = zmq.Context.instance().socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(peer)
            self.sockets[peer] = s
        return self.sockets[peer]

    def send(self, peer, kind, **meta):
        note = uuid.uuid4().hex
        meta["note"] = note
        self.pending[note] = [peer, kind, meta, time.monotonic(), 0.0]
        self.tick()

    def tick(self):
        now = time.monotonic()
        for s in self.sockets.values():
            while s.poll(0, zmq.POLLIN):
                try:
                    _, meta = parse_control(s.recv_multipart())
                except UmigError:
                    continue
                self.pending.pop(meta.get("note"), None)
        for note, entry in list(self.pending.items()):
            peer, kind, meta, first, last = entry
            if now - first > GIVE_UP_AFTER:
                del self.pending[note]
                self.log(f"gave up telling {peer} {kind} {meta.get('job')}")
            elif now - last >= RESEND_AFTER:
                entry[4] = now
                self._socket(peer).send_multipart(control(kind, **meta), zmq.NOBLOCK)

    def close(self):
        for s in self.sockets.values():
            s.close(0)


class Jobs:
    """This agent's job registry and the requests about jobs (registered on the agent)."""

    def __init__(self, agent, node_endpoint):
        self.agent = agent
        self.endpoint = node_endpoint
        self.jobs = {}
        self.reaped = {}        # restored PID -> (ended, monotonic) not (yet) claimed by a job
        self.last_adopted = 0.0
        self.released = []      # Popens of jobs that moved away: their frozen originals are still to reap
        self.outbox = Outbox(agent.log)
        self._count = 0
        agent.services.update({"run": self._run, "job": self._job, "adopt": self._adopt,
                               "job-moved": self._moved_note, "job-exit": self._exit_note})
        agent.on_reaped.append(self._restored_ended)
        agent.tickers.append(self.tick)

    def running_here(self):
        return [j for j in self.jobs.values() if j.state in ("running", "migrating") and j.node == self.agent.name]

    def by_pid(self, pid):
        for job in self.running_here():
            if job.pid == pid:
                return job
        return None

    # -- requests
    def _run(self, identity, meta):
        try:
            argv = [str(a) for a in meta["argv"]]
            stdout, stderr = str(meta["stdout"]), str(meta["stderr"])
            if not argv:
                raise ValueError("no command")
            with open(stdout, "ab") as out, open(stderr, "ab") as err:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        cwd=meta.get("cwd") or "/", env=meta.get("env") or None,
                                        start_new_session=True, close_fds=True)
        except (KeyError, TypeError, ValueError, OSError) as e:
            self.agent.reply(identity, "failed", reason=f"cannot start the job: {e}")
            return
        self._count += 1
        job = Job(f"{self.agent.name}.{self._count}", argv, self.endpoint, stdout, stderr, proc.pid,
                  self.agent.name)
        job.proc = proc
        self.jobs[job.id] = job
        self.agent.log(f"job {job.id} started as pid {proc.pid}: {' '.join(argv)[:200]}")
        self.agent.reply(identity, "started", **job.record())

    def _job(self, identity, meta):
        job = self.jobs.get(meta.get("job"))
        if job is None:
            self.agent.reply(identity, "failed", reason=f"no job {meta.get('job')!r} started here")
        else:
            self.agent.reply(identity, "job", **job.record())

    def _adopt(self, identity, meta):
        self.agent.reply(identity, "ok", note=meta.get("note"))
        job = self.jobs.get(meta["job"])
        if job is not None and job.node == self.agent.name and job.pid == meta["pid"]:
            return  # a repeat
        if job is None:
            job = Job(meta["job"], meta["argv"], meta["origin"], meta["stdout"], meta["stderr"], started=meta["started"])
            self.jobs[job.id] = job
        job.pid, job.node, job.state, job.proc = meta["pid"], self.agent.name, "running", None
        job.carried_age, job.moved_at = float(meta["carried_age"]), time.time()
        self.last_adopted = job.moved_at
        self.agent.log(f"job {job.id} runs here as pid {job.pid} (CPU age {job.carried_age:.2f} s)")
        if job.origin != self.endpoint:
            self.outbox.send(job.origin, "job-moved", job=job.id, node=self.agent.name, pid=job.pid)
        ended = self.reaped.pop(job.pid, None)
        if ended:
            self._ended(job, ended[0])

    def _moved_note(self, identity, meta):
        self.agent.reply(identity, "ok", note=meta.get("note"))
        job = self.jobs.get(meta.get("job"))
        if job is not None and job.state != "exited":
            job.node, job.pid, job.state = meta["node"], meta["pid"], "away"

    def _exit_note(self, identity, meta):
        self.agent.reply(identity, "ok", note=meta.get("note"))
        job = self.jobs.get(meta.get("job"))
        if job is not None and job.state != "exited":
            job.node = meta.get("node", job.node)
            self._finish(job, tuple(meta["ended"]), meta.get("finished"))

    # -- ends
    def _restored_ended(self, pid, ended):
        job = self.by_pid(pid)
        if job is None:
            self.reaped[pid] = (ended, time.monotonic())
        elif job.state == "migrating":
            # Most likely the frozen original, ended by a migration that succeeded: only the
            # migration's outcome tells.
            job.exit_while_migrating = ended
        else:
            self._ended(job, ended)

    def _ended(self, job, ended):
        """The job ended here: tell its origin (or finish it, when that is us)."""
        self.agent.log(f"job {job.id} (pid {job.pid}) {describe_end(ended)}")
        if job.origin == self.endpoint:
            self._finish(job, ended)
        else:
            job.state, job.ended = "exited", ended
            self.outbox.send(job.origin, "job-exit", job=job.id, node=self.agent.name, ended=list(ended),
                             finished=time.time())

    def _finish(self, job, ended, finished=None):
        job.state, job.ended, job.ended_at = "exited", tuple(ended), time.monotonic()
        job.finished = finished or time.time()

    def tick(self):
        now = time.monotonic()
        for job in list(self.jobs.values()):
            if job.proc is not None and job.state in ("running", "migrating") and job.proc.poll() is not None:
                code = job.proc.returncode
                ended = ("signal", -code) if code < 0 else ("status", code)
                if job.state == "running":
                    self._ended(job, ended)
                else:
                    job.exit_while_migrating = ended
            if job.state == "exited":
                # Elsewhere the origin has been told (the outbox repeats it); the origin keeps
                # the record a while for `umig run` to collect.
                if job.origin != self.endpoint or now - job.ended_at > KEEP_FINISHED:
                    del self.jobs[job.id]
        self.released = [p for p in self.released if p.poll() is None]
        for pid, (_, at) in list(self.reaped.items()):
            if now - at > KEEP_REAPED:
                del self.reaped[pid]
        self.outbox.tick()

    # -- migration, driven by the balancer
    def cpu_age(self, job):
        try:
            times = psutil.Process(job.pid).cpu_times()
            return job.carried_age + times.user + times.system
        except psutil.Error:
            return job.carried_age

    def migrating(self, job):
        job.state = "migrating"

    def migrated(self, job, ok, target=None, target_pid=None, age=0.0):
        """The outcome of moving a job away: on success the target adopts it; on failure it runs
        on here (or its end, if it ended meanwhile, is reported now)."""
        ended, job.exit_while_migrating = job.exit_while_migrating, None
        if not ok:
            job.state = "running"
            if ended:
                self._ended(job, ended)
            return
        job.state = "away"
        if job.proc is not None:
            self.released.append(job.proc)
        job.proc = None
        self.outbox.send(target, "adopt", job=job.id, argv=job.argv, origin=job.origin, stdout=job.stdout,
                         stderr=job.stderr, started=job.started, pid=target_pid, carried_age=age)
        if job.origin != self.endpoint:
            self.jobs.pop(job.id, None)


# --------------------------------------------------------------------------- umig run

def request(agent, kind, answer, timeout=10.0, **meta):
    """One request to an agent and its answer, which must be `answer` (UmigError otherwise)."""
    connection = Connection(endpoint(agent), timeout)
    try:
        connection.send_control(kind, **meta)
        return connection.expect(answer, kind)
    finally:
        connection.close()


def start(agent, argv, stdout=None, stderr=None):
    """Start a job through the agent; returns (job record, the directory umig made for its
    output or None)."""
    directory = None
    if stdout is None or stderr is None:
        directory = os.path.realpath(tempfile.mkdtemp(prefix="umig-job-"))
        stdout = stdout or os.path.join(directory, "stdout")
        stderr = stderr or os.path.join(directory, "stderr")
    record = request(agent, "run", "started", argv=list(argv), cwd=os.getcwd(), env=dict(os.environ),
                     stdout=os.path.abspath(stdout), stderr=os.path.abspath(stderr))
    return record, directory


def wait(agent, job, poll=0.25):
    """Wait for the job's end as its origin agent sees it; returns its final record."""
    while True:
        record = request(agent, "job", "job", job=job)
        if record["state"] == "exited":
            return record
        time.sleep(poll)


def exit_code(ended):
    kind, n = ended
    return 128 + n if kind == "signal" else n


def run(agent, argv, stdout=None, stderr=None, detach=False, as_json=False):
    """umig run: start the job; unless detached, wait for it, pass on the output umig kept for it
    and return its exit status (128 + N for death by signal N, as a shell does)."""
    record, directory = start(agent, argv, stdout, stderr)
    if detach:
        print(json.dumps(record) if as_json else f"job {record['job']} started as pid {record['pid']} on "
              f"{record['node']}; output in {record['stdout']}", flush=True)
        return 0
    final = wait(agent, record["job"])
    if directory:  # what umig kept for the job is this command's own output
        for path, stream in ((record["stdout"], sys.stdout), (record["stderr"], sys.stderr)):
            if os.path.dirname(path) == directory:
                with open(path, "rb") as f:
                    stream.flush()
                    shutil.copyfileobj(f, stream.buffer)
                    stream.flush()
        shutil.rmtree(directory, ignore_errors=True)
    if as_json:
        print(json.dumps(final), flush=True)
    return exit_code(final["ended"])
