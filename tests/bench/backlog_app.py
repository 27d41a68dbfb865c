"""An app with a small accept queue, for tests/bench/accept_queue.sh.

Python's threading HTTP server as many apps run it: HTTP/1.1 keep-alive,
one thread per connection, listen backlog BACKLOG (the standard library's
default is 5), every request answered `ok` after SLEEP_MS. With `close` as
the fourth argument every answer says `Connection: close` and the server
closes the connection after it, as apps that never keep connections do.

Usage: python3 backlog_app.py PORT [SLEEP_MS] [BACKLOG] [close]
"""

import http.server
import sys
import time

PORT = int(sys.argv[1])
SLEEP = float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0.02
BACKLOG = int(sys.argv[3]) if len(sys.argv) > 3 else 5
CLOSE = len(sys.argv) > 4 and sys.argv[4] == "close"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        time.sleep(SLEEP)
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        if CLOSE:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    request_queue_size = BACKLOG
    daemon_threads = True


Server(("127.0.0.1", PORT), Handler).serve_forever()
