"""Small helpers over python-qpid-proton's blocking API (an independent AMQP 1.0 client)."""
import threading
import time

from proton import Message
from proton.reactor import Container
from proton.utils import BlockingConnection


def connect(url, timeout=10, **kwargs):
    # SASL PLAIN over a plain socket needs allow_insecure_mechs.
    return BlockingConnection(url, timeout=timeout, allowed_mechs="PLAIN", allow_insecure_mechs=True, **kwargs)


def connect_as(url, container_id, **kwargs):
    """A connection whose AMQP container id is `container_id` (proton picks a random one;
    durable subscriptions are resumed by container id and link name)."""
    container = Container()
    container.container_id = container_id
    return connect(url, container=container, **kwargs)


class Collector(threading.Thread):
    """Receives from `address` on its own connection until `stop` is set; accepts everything."""

    def __init__(self, url, address, credit=10, name=None):
        super().__init__(daemon=True)
        self.conn = connect(url)
        self.receiver = self.conn.create_receiver(address, credit=credit, name=name)
        self.bodies = []
        self.messages = []
        self.stop = threading.Event()
        self.error = None

    def run(self):
        try:
            while not self.stop.is_set():
                try:
                    msg = self.receiver.receive(timeout=0.2)
                except Exception as e:  # proton.Timeout
                    if type(e).__name__ == "Timeout":
                        continue
                    raise
                self.bodies.append(msg.body)
                self.messages.append(msg)
                self.receiver.accept()
        except Exception as e:
            self.error = e
        finally:
            try:
                self.conn.close()
            except Exception:
                pass


    def next(self, timeout=10):
        """The next message not yet taken by `next` (waits for it)."""
        deadline = time.time() + timeout
        taken = getattr(self, "_taken", 0)
        while len(self.messages) <= taken:
            if self.error is not None:
                raise self.error
            if time.time() > deadline:
                raise TimeoutError(f"no message within {timeout} s")
            time.sleep(0.01)
        self._taken = taken + 1
        return self.messages[taken]

    def close(self):
        self.stop.set()
        self.join(5)


def message(body, **kwargs):
    return Message(body=body, **kwargs)
