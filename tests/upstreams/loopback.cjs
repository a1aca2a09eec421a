// Preloaded into an upstream server started for the tests (node --require): a server that
// listens on a port without naming a host is bound to 127.0.0.1 instead of every address,
// so nothing the tests start is reachable from outside this machine.
const net = require("net");
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if ((typeof args[0] === "number" || typeof args[0] === "string") && /^\d+$/.test(String(args[0]))
      && (args.length === 1 || typeof args[1] === "function")) {
    args.splice(1, 0, "127.0.0.1");
  }
  return listen.apply(this, args);
};
