// Bundles the console (src/) into dist/: app.js (ES module), app.css,
// index.html and THIRD_PARTY_NOTICES.txt. Run by scripts/build-console.sh after the stubs are generated
// and the sources type-check. The output is deterministic: no timestamps,
// hashes or source maps, so the committed dist/ is exactly what the sources
// build (scripts/test.sh rebuilds it and fails on a diff).
import { build } from "esbuild";
import { copyFile, mkdir, readFile, rm, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "dist");

await rm(dist, { recursive: true, force: true });
await mkdir(dist, { recursive: true });
const result = await build({
  absWorkingDir: here,
  metafile: true,
  entryPoints: { app: "src/main.tsx" },
  outdir: "dist",
  bundle: true,
  format: "esm",
  platform: "browser",
  target: ["es2022", "chrome109", "firefox115", "safari16"],
  minify: true,
  jsx: "automatic",
  jsxImportSource: "preact",
  legalComments: "eof",
  charset: "ascii",
  sourcemap: false,
  define: { "process.env.NODE_ENV": '"production"' },
  logLevel: "warning",
});
await copyFile(join(here, "src", "index.html"), join(dist, "index.html"));

// The notices of the npm packages bundled into app.js (their licences ask
// for them to travel with the code), sorted, from what esbuild included.
const packages = new Set();
for (const input of Object.keys(result.metafile.inputs)) {
  const m = /node_modules\/((?:@[^/]+\/)?[^/]+)\//.exec(input);
  if (m) packages.add(m[1]);
}
const root = join(here, "..", "..", "node_modules");
const notices = [];
for (const name of [...packages].sort()) {
  const pkg = JSON.parse(await readFile(join(root, name, "package.json"), "utf8"));
  const repo = typeof pkg.repository === "string" ? pkg.repository : pkg.repository?.url ?? "";
  let text = `${pkg.name} ${pkg.version}\nLicense: ${pkg.license}\n${repo ? `Source: ${repo}\n` : ""}`;
  for (const file of ["LICENSE", "LICENSE.md", "LICENSE.txt"]) {
    try {
      text += "\n" + (await readFile(join(root, name, file), "utf8")).trim() + "\n";
      break;
    } catch {
      // no licence file in this package: its package.json names the licence
    }
  }
  notices.push(text);
}
await writeFile(
  join(dist, "THIRD_PARTY_NOTICES.txt"),
  "The VaultGuard console (app.js) bundles these npm packages.\n\n" + notices.join("\n" + "-".repeat(72) + "\n\n"),
);
