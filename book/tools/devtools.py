"""A minimal Chrome DevTools Protocol client for headless Chromium, on the standard library only.

:class:`Chromium` starts the browser with remote debugging on a loopback port and returns
a :class:`DevToolsSession` attached to its first tab. The session speaks JSON over a
WebSocket (RFC 6455: masked client frames, text frames, a pong sent for each ping). That is
all the protocol needs, so no WebSocket package is required.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

OPCODE_CONTINUATION, OPCODE_TEXT, OPCODE_CLOSE, OPCODE_PING, OPCODE_PONG = 0x0, 0x1, 0x8, 0x9, 0xA


class DevToolsError(RuntimeError):
    """The browser returned an error for a protocol call, or did not respond in time."""


class WebSocket:
    """A client WebSocket connection that sends and receives text messages."""

    def __init__(self, url: str, timeout: float):
        parts = urlparse(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
                   "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(request.encode())
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise DevToolsError(f"the browser closed the connection during the WebSocket handshake to {url}")
            response += chunk
        status_line = response.split(b"\r\n", 1)[0].decode(errors="replace")
        if " 101 " not in status_line:
            raise DevToolsError(f"WebSocket handshake to {url} failed: {status_line}")
        self.buffer = response.split(b"\r\n\r\n", 1)[1]

    def _read_exact(self, count: int) -> bytes:
        while len(self.buffer) < count:
            chunk = self.sock.recv(max(65536, count - len(self.buffer)))
            if not chunk:
                raise DevToolsError("the browser closed the DevTools connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        header = bytes([0x80 | opcode])
        length = len(payload)
        # Client frames are always masked (mask bit 0x80 on the length byte).
        if length < 126:
            header += bytes([0x80 | length])
        elif length < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack("!H", length)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", length)
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send_text(self, text: str) -> None:
        self._send_frame(OPCODE_TEXT, text.encode())

    def receive_text(self) -> str:
        """Return the next complete text message, sending a pong for each ping on the way."""
        message = b""
        while True:
            first, second = self._read_exact(2)
            opcode, final = first & 0x0F, bool(first & 0x80)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack("!H", self._read_exact(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", self._read_exact(8))[0]
            payload = self._read_exact(length)
            if opcode == OPCODE_PING:
                self._send_frame(OPCODE_PONG, payload)
                continue
            if opcode == OPCODE_CLOSE:
                raise DevToolsError("the browser closed the DevTools connection")
            if opcode in (OPCODE_TEXT, OPCODE_CONTINUATION):
                message += payload
                if final:
                    return message.decode()

    def close(self) -> None:
        self.sock.close()


class DevToolsSession:
    """Protocol calls and the events that arrive between them, on one tab."""

    def __init__(self, websocket: WebSocket):
        self.websocket = websocket
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        """Send ``method`` with ``params`` and return its result; events that arrive meanwhile are kept."""
        call_id = next(self.ids)
        self.websocket.send_text(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.websocket.receive_text())
            if message.get("id") == call_id:
                if "error" in message:
                    raise DevToolsError(f"{method} failed: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def wait_for_event(self, method: str, timeout: float) -> dict:
        """Return the first kept or incoming event called ``method``; raise DevToolsError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["method"] == method:
                    return event
            if time.monotonic() > deadline:
                raise DevToolsError(f"no {method} event within {timeout:g} s")
            message = json.loads(self.websocket.receive_text())
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str, timeout_ms: int = 30000):
        """Evaluate JavaScript in the page, await it if it is a promise, and return its JSON value."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True,
                           returnByValue=True, timeout=timeout_ms)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise DevToolsError(f"page script failed: {text}")
        return result["result"].get("value")


class Chromium:
    """A headless Chromium process with remote debugging on a loopback port; a context manager.

    ``flags`` are added to the command line; the profile lives in a temporary folder that
    is removed on exit.
    """

    def __init__(self, executable: str, flags: list[str], startup_timeout: float = 60.0):
        self.executable, self.flags, self.startup_timeout = executable, flags, startup_timeout

    def __enter__(self) -> DevToolsSession:
        self.profile = tempfile.TemporaryDirectory(prefix="chromium-profile-")
        self.log = open(Path(self.profile.name) / "chromium.log", "w+")
        command = [self.executable, *self.flags, f"--user-data-dir={self.profile.name}",
                   "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        port = self._wait_for_port()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            targets = json.load(response)
        page = next(target for target in targets if target.get("type") == "page")
        self.websocket = WebSocket(page["webSocketDebuggerUrl"], timeout=120)
        return DevToolsSession(self.websocket)

    def _wait_for_port(self) -> int:
        """Return the debugging port that Chromium writes to DevToolsActivePort once it listens."""
        port_file = Path(self.profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise DevToolsError(f"Chromium exited with status {self.process.returncode}:\n{self.log.read()[-2000:]}")
            if port_file.exists() and port_file.read_text().strip():
                return int(port_file.read_text().split()[0])
            time.sleep(0.1)
        raise DevToolsError(f"Chromium did not open its debugging port within {self.startup_timeout:g} s")

    def __exit__(self, *exc_info) -> None:
        if hasattr(self, "websocket"):
            self.websocket.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        self.profile.cleanup()
