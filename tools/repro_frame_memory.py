"""Issue 21.6 as a user tries it: `vlmd serve` (the demo model) on a real mosquitto; four
cameras send a 6000x6000 PNG (~120 KB) and ask one question each; prints the RSS of the
vlmd process before, at its peak (sampled every 50 ms) and 3 s after the last final.

    python tools/repro_frame_memory.py "$(which vlmd)"

Needs mosquitto on PATH. Environment variables pass through (VLMD_FRAMES__MAX_TOTAL_BYTES=...).
"""
import io, json, os, socket, subprocess, sys, tempfile, time
import numpy as np, psutil
from PIL import Image
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

port = free_port()
tmp = tempfile.mkdtemp()
conf = os.path.join(tmp, "m.conf")
open(conf, "w").write(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
broker = subprocess.Popen(["mosquitto", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(0.5)
env = dict(os.environ, XDG_STATE_HOME=tmp)
vlmd = subprocess.Popen([sys.argv[1], "serve", "--broker", f"mqtt://127.0.0.1:{port}", "--device-id", "rss",
                         "--log-level", "warning"], env=env)
got = []
c = paho.Client(CallbackAPIVersion.VERSION2)
c.on_message = lambda cl, u, m: got.append((m.topic, m.payload))
c.connect("127.0.0.1", port); c.loop_start()
c.subscribe("vlmd/rss/#", 1)
deadline = time.time() + 300
while not any(t == "vlmd/rss/status" and p == b"online" for t, p in got):
    assert time.time() < deadline and vlmd.poll() is None, "vlmd did not come online"
    time.sleep(0.2)
time.sleep(2)
proc = psutil.Process(vlmd.pid)
before = proc.memory_info().rss
pngs = []
for n in range(4):
    img = Image.new("RGB", (6000, 6000), (40 * n, 90, 160))
    img.paste((250, 250, 0), (1000 + 300 * n, 1000, 3000 + 300 * n, 3000))
    b = io.BytesIO(); img.save(b, format="PNG"); pngs.append(b.getvalue())
for n, data in enumerate(pngs):
    c.publish(f"vlmd/rss/frame/cam{n}", data, qos=1).wait_for_publish(10)
time.sleep(1)
for n in range(4):
    c.publish("vlmd/rss/ask", json.dumps({"id": f"big{n}", "camera": f"cam{n}", "text": "What colour is the square?",
                                          "stream": False}), qos=1).wait_for_publish(10)
peak = before
finals = {}
deadline = time.time() + 600
while len(finals) < 4:
    assert time.time() < deadline, "no finals"
    for t, p in list(got):
        if t.startswith("vlmd/rss/answer/"):
            finals[t] = json.loads(p)
    peak = max(peak, proc.memory_info().rss)
    time.sleep(0.05)
time.sleep(3)
after = proc.memory_info().rss
print(json.dumps({"png_bytes": [len(p) for p in pngs], "rss_before_mb": round(before / 1e6, 1),
                  "rss_peak_mb": round(peak / 1e6, 1), "rss_after_mb": round(after / 1e6, 1),
                  "finals": {k.rsplit('/', 1)[1]: (v["finish_reason"], v["text"][:30]) for k, v in sorted(finals.items())}}))
vlmd.terminate(); vlmd.wait(60); broker.terminate(); broker.wait(10)
