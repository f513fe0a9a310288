"""A real ComfyUI server for tests: ComfyUI's own main.py in a child process, driven as the frontend drives it.

The server runs on the CPU on a free loopback port, with a temporary base directory (custom_nodes/, models/,
input/, output/, user/) and an in-memory database, so the ComfyUI tree itself is only read. Prompts go in
through ``POST /prompt``; progress, executing/executed messages, binary latent previews and the final
``execution_success`` / ``execution_error`` / ``execution_interrupted`` come back over ``/ws``, exactly
what the frontend sees. A run is over at the ``executing`` message with node None, which ComfyUI sends once
the prompt's history is stored.
"""

import asyncio
import json
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

DONE = {"execution_success", "execution_error", "execution_interrupted"}
PREVIEW_IMAGE = 1  # protocol.BinaryEventTypes.PREVIEW_IMAGE: 4-byte event, 4-byte format, image bytes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    """What the websocket said about one queued prompt."""
    prompt_id: str
    events: list = field(default_factory=list)    # (type, data) of the JSON messages for this prompt
    previews: list = field(default_factory=list)  # image bytes of binary preview messages
    status: str = ""                              # the DONE message that ended it

    def of_type(self, kind):
        return [data for t, data in self.events if t == kind]

    @property
    def error(self):
        errors = self.of_type("execution_error")
        return errors[0] if errors else None


class ComfyServer:
    def __init__(self, comfyui, base_dir):
        self.comfyui, self.base = Path(comfyui), Path(base_dir)
        self.log_path = self.base / "server.log"
        self.process = None
        self.url = None

    def start(self, timeout=180):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        # -B: the ComfyUI tree is only read, so no __pycache__ next to its modules
        command = [sys.executable, "-u", "-B", str(self.comfyui / "main.py"), "--cpu", "--listen", "127.0.0.1",
                   "--port", str(port), "--base-directory", str(self.base), "--preview-method", "latent2rgb",
                   "--database-url", "sqlite:///:memory:", "--disable-auto-launch", "--disable-api-nodes"]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=self.base, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.log_tail()}")

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            self._log.close()

    @property
    def alive(self):
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines=60):
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log(self):
        return self.log_path.read_text(errors="replace")

    # --- HTTP, as the frontend calls it -------------------------------------------------------------------

    def request(self, method, path, payload=None):
        """(HTTP status, decoded JSON body or None) of one request to the server."""
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        return status, (json.loads(body) if body else None)

    def get(self, path):
        status, body = self.request("GET", path)
        assert status == 200, f"GET {path}: {status} {body}"
        return body

    def post(self, path, payload=None):
        return self.request("POST", path, payload)

    # --- running prompts -------------------------------------------------------------------------------

    def run(self, prompt, interrupt_when=None, timeout=600):
        """Queue ``prompt`` and follow it on the websocket until it ends and its /history entry is stored;
        returns a Run.

        ``interrupt_when(run)`` is checked after every message; the first time it is true, ``POST /interrupt``
        is sent, as the frontend's cancel button does.
        """
        return asyncio.run(asyncio.wait_for(self._run(prompt, interrupt_when), timeout))

    async def _run(self, prompt, interrupt_when):
        client_id = uuid.uuid4().hex
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{self.url}/ws?clientId={client_id}", max_msg_size=0) as ws:
                async with session.post(f"{self.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                    answer = await r.json()
                    if r.status != 200:
                        raise PromptRejected(answer)
                run, interrupted = Run(answer["prompt_id"]), False
                async for message in ws:
                    if message.type == aiohttp.WSMsgType.BINARY:
                        event, = struct.unpack(">I", message.data[:4])
                        if event == PREVIEW_IMAGE:
                            run.previews.append(message.data[8:])
                    elif message.type == aiohttp.WSMsgType.TEXT:
                        body = json.loads(message.data)
                        data = body.get("data") or {}
                        if data.get("prompt_id") not in (None, run.prompt_id):
                            continue
                        run.events.append((body["type"], data))
                        if body["type"] in DONE:
                            run.status = body["type"]
                        if body["type"] == "executing" and data.get("node") is None and data.get("prompt_id"):
                            # main.py's prompt_worker sends this after storing the prompt's /history entry;
                            # the DONE message comes before that
                            assert run.status, f"prompt ended without {sorted(DONE)}: {run.events}"
                            return run
                    else:
                        raise ConnectionError(f"websocket closed: {message}")
                    if interrupt_when and not interrupted and not run.status and interrupt_when(run):
                        interrupted = True
                        async with session.post(f"{self.url}/interrupt") as r:
                            assert r.status == 200
        raise ConnectionError("websocket ended before the prompt did")

    def cancel(self, prompt_id, timeout=120):
        """Take a queued prompt off the queue, or interrupt it while it runs (as the frontend's queue panel
        does), and return once the server's /queue no longer holds it."""
        self.post("/queue", {"delete": [prompt_id]})
        deadline = time.monotonic() + timeout
        while True:
            queue = self.get("/queue")
            running = {item[1] for item in queue["queue_running"]}
            if prompt_id not in running | {item[1] for item in queue["queue_pending"]}:
                return
            assert time.monotonic() < deadline, f"prompt {prompt_id} still queued after {timeout} s"
            if prompt_id in running:  # again on every poll: a run that starts after an interrupt clears it
                self.post("/interrupt", {"prompt_id": prompt_id})
            time.sleep(0.1)

    def outputs(self, run):
        """The prompt's outputs as /history reports them: {node id: {"images"|"gifs"|...: [file entries]}}."""
        return self.get(f"/history/{run.prompt_id}")[run.prompt_id]["outputs"]

    def output_file(self, entry):
        return self.base / entry.get("type", "output") / entry.get("subfolder", "") / entry["filename"]


class PromptRejected(Exception):
    """POST /prompt answered 400: the prompt failed ComfyUI's validation."""
