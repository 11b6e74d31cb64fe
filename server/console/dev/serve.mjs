// Runs the console's mock server (mock.ts): bundles it for Node with esbuild
// (it imports the generated TypeScript stubs) into node_modules/.cache and
// starts it. Development only. From the repository root:
//   node server/console/dev/serve.mjs [--port 8089]
// Environment: MOCK_ROLES=admin|approver|auditor (comma separated).
import { build } from "esbuild";
import { mkdir } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..", "..", "..");
const out = join(root, "node_modules", ".cache", "vaultguard-console-mock", "mock.mjs");
await mkdir(dirname(out), { recursive: true });
await build({
  entryPoints: [join(here, "mock.ts")],
  outfile: out,
  bundle: true,
  platform: "node",
  format: "esm",
  target: "node20",
  logLevel: "warning",
});
process.chdir(root);
await import(pathToFileURL(out).href);
