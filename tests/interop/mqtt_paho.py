"""MQTT 5 over WebSocket (`/mqtt`, optionally TLS) with the Eclipse Paho client: subscribe,
publish at QoS 1, and receive both its own publication and one sent by another client.

Usage: mqtt_paho.py HOST PORT TOPIC CA_FILE|- VERSION EXPECTED...  (VERSION: 5 or 3.1.1;
prints each message; exit 0 when every EXPECTED payload arrived within 30 s)
"""
import sys
import threading

import paho.mqtt.client as mqtt

host, port, topic, ca, version = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
expected = set(sys.argv[6:])
got = set()
done = threading.Event()

c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-ws-" + version, transport="websockets",
                protocol=mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311)
c.ws_set_options(path="/mqtt")
if ca != "-":
    c.tls_set(ca_certs=ca)


def on_connect(client, userdata, flags, reason, props):
    if reason.is_failure:
        print("connect refused:", reason, flush=True)
        done.set()
        return
    client.subscribe(topic, qos=1)


def on_subscribe(client, userdata, mid, reasons, props):
    print("subscribed:", [str(r) for r in reasons], flush=True)
    client.publish(topic, "from paho", qos=1)


def on_message(client, userdata, msg):
    payload = msg.payload.decode()
    print("message:", payload, flush=True)
    got.add(payload)
    if expected <= got:
        done.set()


c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
c.connect(host, port)
c.loop_start()
done.wait(30)
c.loop_stop()
sys.exit(0 if expected <= got else 1)
