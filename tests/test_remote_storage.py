"""Run directories, checkpoints, metrics, sweeps and data caches on ``gs://``, end to end, offline.

The backend is a fake Google Cloud Storage: ``gcp-storage-emulator`` (a JSON-API server in Python)
on 127.0.0.1. The code under test does not know it is fake: epath reaches it through gcsfs
(``STORAGE_EMULATOR_HOST``) and orbax through tensorstore's own GCS driver (``TENSORSTORE_GCS_HTTP_URL``,
with a fixed test token), exactly the two clients a run on a TPU pod uses for ``gs://`` paths. So
every remote branch runs: object writes instead of renames, the lease lock instead of flock, no
free-space check, metrics staged locally and uploaded, the token cache mirrored locally. (The emulator
ignores generation preconditions, so the exclusive create of the lease is not exercised for races
here; its read-back check is.)

Two gaps of the emulator against real GCS are filled in here, both of which once failed CI: it lacks
``objects.move`` (see ``_move``), and its downloads carry no ``x-goog-generation`` header, so tensorstore
reads generation 0 and refuses its next conditional write of that object ("Malformed StorageGeneration");
OCDBT rewrites its manifest that way whenever it has re-read it, a matter of timing.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from http import HTTPStatus

import numpy as np
import pytest
from etils import epath

from helpers import subprocess_env, tiny_config, train_losses, write_config
from lmu_jax import storage
from lmu_jax.config import config_from_dict
from lmu_jax.errors import UserError
from lmu_jax.train.loop import Trainer
from lmu_jax.train.rundir import RunDir

pytest.importorskip("gcsfs")
emulator = pytest.importorskip("gcp_storage_emulator.server")
from gcp_storage_emulator.exceptions import NotFound  # noqa: E402 (after the skip)
from gcp_storage_emulator.handlers import objects  # noqa: E402
BUCKET = "lmu-test"


def _move(request, response, storage_, *args, **kwargs):
    """GCS's ``objects.move`` (``.../o/SRC/moveTo/o/DEST``), which gcsfs renames with; the emulator
    lacks it and answers 501, which gcsfs retries for ~30 s per object before it copies and deletes."""
    bucket, source, dest = (request.params[k] for k in ("bucket_name", "object_id", "dest_object_id"))
    try:
        moved = objects._copy(request.base_url, storage_, bucket, source, bucket, dest)
        storage_.delete_file(bucket, source)
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return
    response.json(moved)


def _download_with_generation(download):
    """The emulator's download plus the generation headers real GCS sends with every object read."""
    def handler(request, response, storage_, *args, **kwargs):
        try:  # read before the content: if the object changes in between, the generation is the older one
            obj = storage_.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            obj = None  # the download answers 404
        download(request, response, storage_, *args, **kwargs)
        if obj is not None and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj["metageneration"]
    return handler


def _patched_routes(handlers, old_download, new_download):
    """The emulator's routes with objects.move added (first: the generic object route would take it for
    an object's name) and ``new_download`` wherever ``old_download`` was."""
    move = (rf"^{emulator.settings.API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
            r"/moveTo/o/(?P<dest_object_id>.*[^/]+)$", {emulator.POST: _move})
    return (move, *[(pattern, {method: new_download if fn is old_download else fn for method, fn in methods.items()})
                    for pattern, methods in handlers])


@pytest.fixture(scope="module")
def fake_gcs(tmp_path_factory):
    """The emulator in a thread of this process, and the environment that points both clients at it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = emulator.create_server("127.0.0.1", port, in_memory=False, default_bucket=BUCKET,
                                    data_dir=str(tmp_path_factory.mktemp("gcs")))
    saved = saved_routes, saved_download = emulator.HANDLERS, objects.download
    download = _download_with_generation(saved_download)
    emulator.HANDLERS = _patched_routes(saved_routes, saved_download, download)
    objects.download = download  # objects.get (``?alt=media``) calls it by this name
    server.start()
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{port}",
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
           "LMU_JAX_MIRROR_DIR": str(tmp_path_factory.mktemp("mirror"))}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()
    emulator.HANDLERS, objects.download = saved


def test_fake_gcs_reads_give_generations_tensorstore_can_write_against(fake_gcs):
    """What OCDBT does with its manifest: read it, then write it on the condition that it is unchanged."""
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "gcs", "bucket": BUCKET, "path": "fidelity/"}).result()
    written = kv.write("manifest", b"one").result()
    read = kv.read("manifest").result()
    assert read.value == b"one" and read.stamp.generation == written.generation != b"\0" * 9
    # a read without a generation made this write fail with "Malformed StorageGeneration"
    kv.write("manifest", b"two", if_equal=read.stamp.generation).result()
    assert kv.read("manifest").result().value == b"two"


def test_paths_local_remote_and_refused():
    assert not storage.is_remote(storage.path("file:///tmp/x")) and str(storage.path("file:///tmp/x")) == "/tmp/x"
    assert storage.is_remote(storage.path("gs://bucket/runs/x"))
    for bad in ("gs2://bucket/x", "http://host/x", "gs:///no-bucket"):
        with pytest.raises(UserError, match="gs://BUCKET/PATH"):
            RunDir(bad)  # never a local folder called 'gs2:'


def _remote_steps(run):
    """Committed checkpoints: on GCS orbax writes <step>/ in place and commits it with this file."""
    folder = run / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists()) \
        if folder.exists() else []


def _failed_saves(log_text):
    """The checkpointer's warnings of a failed write or read-back."""
    return re.findall(r"checkpoint \d+.*(?:fail|not written correctly).*", log_text)


@pytest.mark.slow
def test_train_kill_resume_done_collect_on_gs(tmp_path, kjv_cache, fake_gcs):
    from lmu_jax.sweep.collect import collect

    raw = tiny_config(f"gs://{BUCKET}/cache", train={"steps": 12}, checkpoint={"every": 4, "keep": 2})
    config = write_config(tmp_path / "c.yaml", raw)
    sweep = epath.Path(f"gs://{BUCKET}/sweeps/remote")
    run = sweep / "runs" / "one"
    command = [sys.executable, "-m", "lmu_jax.cli", "train", "--config", str(config), "--run-dir", str(run)]
    env = subprocess_env(**fake_gcs, LMU_JAX_TEST_CKPT_DELAY_S=3)  # slow checkpoints: killed mid-run
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (_remote_steps(run) and max(_remote_steps(run)) >= 4):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    assert json.loads((run / ".lock").read_text())["pid"] == proc.pid  # the lease object
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate()[0]
    assert max(_remote_steps(run)) < 12, output
    assert not _failed_saves(output), output[-4000:]
    uncommitted = [p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()
                   and not (p / "commit_success.txt").exists()]  # killed mid-write, most likely
    assert "copying the cache" in output  # the remote token cache was mirrored to this host
    assert not (run / "DONE").exists()

    resumed = subprocess.run(command, env=subprocess_env(**fake_gcs), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout, resumed.stderr[-4000:]  # the dead holder's lease was taken over
    # interrupted writes were set aside before their step was saved again, not failed into and retried:
    # no save or read-back failed, not even once
    assert not _failed_saves(resumed.stderr), (uncommitted, resumed.stderr[-4000:])
    assert (run / "DONE").exists() and not (run / ".lock").exists()
    assert not list(epath.Path(os.getcwd()).glob("gs:*"))  # nothing went to a local folder named gs:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 13))

    reference = Trainer(config_from_dict(tiny_config(kjv_cache, train={"steps": 12},
                                                     checkpoint={"every": 4, "keep": 2})), tmp_path / "local")
    reference.train()
    np.testing.assert_allclose([r["loss"] for r in records if r["kind"] == "train"],
                               [loss for _, loss in train_losses(tmp_path / "local")], rtol=1e-6)

    result = collect(str(sweep))
    assert [row["run_id"] for row in result["rows"]] == [json.loads((run / "eval.json").read_text())["run_id"]]
    assert (sweep / "results.csv").read_text().count("\n") == 2


def test_lease_is_taken_over_only_when_its_holder_stops_renewing(tmp_path):
    """The object-store run lock, driven on a local path (the same code: exclusive create, read-back,
    renewal by a thread); ttl 0.6 s."""
    from lmu_jax.train.rundir import Lease

    lock = epath.Path(tmp_path / ".lock")
    other = {"pid": 4242, "host": "a-worker-of-another-slice"}
    holder = Lease.acquire(lock, other, "--run-dir X", ttl=0.6)  # alive: renews every 0.2 s
    with pytest.raises(UserError, match="--run-dir X is in use by pid 4242 on a-worker-of-another-slice"):
        Lease.acquire(lock, {"pid": 1, "host": "me"}, "--run-dir X", ttl=0.6)
    holder._stop.set()  # the holder dies (its slice was preempted): no more renewals, the lease stays
    holder._thread.join()
    mine = Lease.acquire(lock, {"pid": 1, "host": "me"}, "--run-dir X", ttl=0.6)
    assert json.loads(lock.read_text())["host"] == "me"
    mine.release()
    assert not lock.exists()
