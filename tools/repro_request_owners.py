"""Issue 21.1, 21.2, 21.3 and 21.5 as a user tries them: `vlmd serve` (the demo model) on a
real mosquitto, paho clients; prints the finals each client received.

    python tools/repro_request_owners.py "$(which vlmd)"

1: clients A and B both ask id q1 (own reply_to); 2: long3 queued behind a burst, then a
malformed copy and a valid repeat; 3: B names A's conversation, then resets it; 5: a
conversation's turn 2 queued, vlmd SIGKILLed and restarted. Needs mosquitto on PATH.
"""
import io, json, os, signal, socket, subprocess, sys, tempfile, time
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from daemon.commands.demo.scenes import draw_scene

VLMD = sys.argv[1]
def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
port = free_port(); tmp = tempfile.mkdtemp()
open(f"{tmp}/m.conf", "w").write(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
broker = subprocess.Popen(["mosquitto", "-c", f"{tmp}/m.conf"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(0.5)
env = dict(os.environ, XDG_STATE_HOME=tmp)
def serve():
    return subprocess.Popen([VLMD, "serve", "--broker", f"mqtt://127.0.0.1:{port}", "--device-id", "repro",
                             "--log-level", "warning"], env=env)
got = []
c = paho.Client(CallbackAPIVersion.VERSION2)
c.on_message = lambda cl, u, m: got.append((time.time(), m.topic, m.payload))
c.connect("127.0.0.1", port); c.loop_start(); c.subscribe([("vlmd/repro/#", 1), ("clients/#", 1)])
def online(after=0.0):
    deadline = time.time() + 300
    while not any(t == "vlmd/repro/status" and p == b"online" and ts > after for ts, t, p in got):
        assert time.time() < deadline; time.sleep(0.2)
def ask(**req): c.publish("vlmd/repro/ask", json.dumps(req), qos=1).wait_for_publish(10)
def finals(topic):
    out = []
    for _, t, p in got:
        if t == topic and p:
            body = json.loads(p)
            if body.get("done"): out.append(body)
    return out
def show(topic):
    return [(f["finish_reason"], (f.get("error") or {}).get("code"), f["text"][:40], f.get("turn")) for f in finals(topic)]
def errors():
    return [(json.loads(p)["code"], json.loads(p).get("request_id")) for _, t, p in got if t == "vlmd/repro/error"]

vlmd = serve(); online()
image, scene = draw_scene(4); b = io.BytesIO(); image.save(b, format="PNG")
c.publish("vlmd/repro/frame/door", b.getvalue(), qos=1).wait_for_publish(10); time.sleep(0.5)

print("== 1. two clients, one id ==")
ask(id="q1", camera="door", text="What colour is the star?", stream=False, reply_to="clients/A")
time.sleep(4)
ask(id="q1", camera="door", text="What colour is the star?", stream=False, reply_to="clients/B")
time.sleep(6)
print("A:", show("clients/A")); print("B:", show("clients/B"))

print("== 2. a malformed copy of a queued id ==")
for n in range(6):
    ask(id=f"burst{n}", camera="door", text="Describe the image.", stream=False, max_tokens=256)
ask(id="long3", camera="door", text="How many shapes are there?", stream=False)
ask(id="long3", text="")
ask(id="long3", camera="door", text="How many shapes are there?", stream=False)
time.sleep(15)
print("long3 finals:", show("vlmd/repro/answer/long3")); print("errors:", errors())

print("== 3. two clients, one conversation ==")
ask(id="c-a1", camera="door", text="Describe the image shortly.", conversation="c1", stream=False, reply_to="clients/A/c")
time.sleep(4)
ask(id="c-b1", text="How many shapes are there?", conversation="c1", stream=False, reply_to="clients/B/c")
time.sleep(3)
ask(id="c-b2", conversation="c1", reset=True, stream=False, reply_to="clients/B/c")
time.sleep(3)
ask(id="c-a2", text="What colour is the star?", conversation="c1", stream=False, reply_to="clients/A/c")
time.sleep(4)
print("A:", show("clients/A/c")); print("B:", show("clients/B/c"))

print("== 5. a conversation turn recovered after SIGKILL ==")
ask(id="k-1", camera="door", text="Describe the image shortly.", conversation="k", stream=False)
time.sleep(4)
for n in range(6):
    ask(id=f"burst2-{n}", camera="door", text="Describe the image.", stream=False, max_tokens=256)
ask(id="k-2", text="What colour is the star?", conversation="k", stream=False)
time.sleep(0.3)
vlmd.send_signal(signal.SIGKILL); vlmd.wait()
killed_at = time.time()
print("k-2 before the kill:", show("vlmd/repro/answer/k-2"))
vlmd = serve(); online(killed_at); time.sleep(8)
print("k-2 after the restart:", show("vlmd/repro/answer/k-2"))
vlmd.terminate(); vlmd.wait(60); broker.terminate(); broker.wait(10)
