// Builds the console into dist/: dist/index.html and dist/assets/<name>-<hash>.{js,css}.
//
// The SDK is bundled from its TypeScript source (tsconfig "paths"), so the console always runs
// the SDK of the same checkout and no separate SDK build is needed. Hashed names let the gateway
// serve assets as immutable; index.html (no-cache) is the only file whose name stays. The page
// has no inline script or style, as the gateway's Content-Security-Policy demands.
import { build } from "esbuild";
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "dist");
await rm(dist, { recursive: true, force: true });
await mkdir(join(dist, "assets"), { recursive: true });

const result = await build({
  entryPoints: [join(here, "src", "main.ts")],
  bundle: true,
  format: "esm",
  platform: "browser",
  target: ["es2022"],
  outdir: join(dist, "assets"),
  entryNames: "[name]-[hash]",
  assetNames: "[name]-[hash]",
  minify: true,
  sourcemap: "linked",
  metafile: true,
  tsconfig: join(here, "tsconfig.json"),
  legalComments: "linked",
  logLevel: "warning",
});

const outputs = Object.keys(result.metafile.outputs).map((p) => basename(p));
const js = outputs.find((n) => n.startsWith("main-") && n.endsWith(".js"));
const css = outputs.find((n) => n.startsWith("main-") && n.endsWith(".css"));
if (!js || !css) throw new Error(`esbuild wrote no main bundle: ${outputs.join(", ")}`);
const template = await readFile(join(here, "src", "index.html"), "utf8");
await writeFile(join(dist, "index.html"), template.replace("%CSS%", `/assets/${css}`).replace("%JS%", `/assets/${js}`));
console.log(`console: dist/index.html, dist/assets/${js}, dist/assets/${css}`);
