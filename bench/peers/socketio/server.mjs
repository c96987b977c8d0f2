// Socket.IO peer for side-by-side runs: POST /publish broadcasts the JSON body to every
// connected socket as event "msg". WebSocket transport only, no compression. Loopback.
import { createServer } from 'node:http';
import { Server } from 'socket.io';

const port = Number(process.env.PORT ?? 8202);
const http = createServer((req, res) => {
  if (req.method === 'POST' && req.url === '/publish') {
    let body = '';
    req.on('data', (c) => { body += c; });
    req.on('end', () => {
      try { io.emit('msg', JSON.parse(body)); } catch { res.writeHead(400); res.end(); return; }
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': '2' });
      res.end('{}');
    });
    return;
  }
  res.writeHead(404, { 'content-length': '0' });
  res.end();
});
const io = new Server(http, { transports: ['websocket'], perMessageDeflate: false, serveClient: false });
http.listen(port, '127.0.0.1', () => console.log(`socket.io peer on 127.0.0.1:${port}`));
