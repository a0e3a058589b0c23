// driver.mjs drives `ferry mcp` through the official TypeScript MCP SDK, an
// MCP client independent of the Go SDK the server is built with. The Go test
// (integration/mcp) is in charge: it writes one JSON request per line on
// stdin and reads one JSON answer per line on stdout, so it can change the
// cluster between two calls (a stale plan) and assert on every answer.
//
// Requests:
//   {"op":"connect","session":S,"command":C,"args":[...],"env":{...}}  start `ferry mcp` over stdio
//   {"op":"connect","session":S,"url":U,"token":T}          streamable HTTP, bearer T
//   {"op":"tools","session":S}                               tools/list
//   {"op":"call","session":S,"name":N,"arguments":{...}}     tools/call
//   {"op":"close","session":S}
// Every answer is {"ok":true,...} or {"ok":false,"error":M,"code":C} for a
// protocol error (a tool's refusal is a result with isError, not an error).
import { createInterface } from "node:readline";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport, getDefaultEnvironment } from "@modelcontextprotocol/sdk/client/stdio.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const sessions = new Map();

async function connect(req) {
  if (sessions.has(req.session)) throw new Error(`session ${req.session} is already connected`);
  let transport;
  if (req.url) {
    const headers = req.token ? { Authorization: `Bearer ${req.token}` } : {};
    transport = new StreamableHTTPClientTransport(new URL(req.url), { requestInit: { headers } });
  } else {
    // stderr stays the driver's, which the Go test keeps for its failure log.
    // The SDK passes a child only a few variables unless told more (env).
    const env = req.env ? { ...getDefaultEnvironment(), ...req.env } : undefined;
    transport = new StdioClientTransport({ command: req.command, args: req.args ?? [], env, stderr: "inherit" });
  }
  const client = new Client({ name: "ferry-ts-driver", version: "1.0.0" });
  await client.connect(transport);
  sessions.set(req.session, client);
  return {
    server: client.getServerVersion(),
    instructions: client.getInstructions() ?? "",
    capabilities: client.getServerCapabilities() ?? {},
  };
}

function session(req) {
  const c = sessions.get(req.session);
  if (!c) throw new Error(`no session ${req.session}: connect first`);
  return c;
}

async function handle(req) {
  switch (req.op) {
    case "connect":
      return connect(req);
    case "tools": {
      const res = await session(req).listTools();
      return { tools: res.tools };
    }
    case "call": {
      // The SDK checks structuredContent against the tool's output schema
      // (from the last tools/list) and throws when it does not match.
      const res = await session(req).callTool({ name: req.name, arguments: req.arguments ?? {} });
      const text = (res.content ?? []).filter((c) => c.type === "text").map((c) => c.text).join("");
      return { isError: res.isError === true, text, structured: res.structuredContent ?? null };
    }
    case "close": {
      await session(req).close();
      sessions.delete(req.session);
      return {};
    }
    default:
      throw new Error(`unknown op ${JSON.stringify(req.op)}`);
  }
}

const rl = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of rl) {
  if (line.trim() === "") continue;
  let answer;
  try {
    answer = { ok: true, ...(await handle(JSON.parse(line))) };
  } catch (e) {
    answer = { ok: false, error: String(e?.message ?? e), code: e?.code ?? null };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
}
for (const c of sessions.values()) await c.close();
