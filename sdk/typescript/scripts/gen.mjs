// Generates src/generated/openapi.ts from openapi/cyberdesk.v1.openapi.json (itself generated
// from the protos by tools/gen_openapi.py). `--check` regenerates in memory and fails when the
// committed file differs, so `make lint` catches a proto change whose TypeScript types were not
// regenerated. The generator's API is used rather than its CLI so that the output is compared
// byte for byte, with no temporary file and no dependence on the CLI's progress output.
import { readFile, writeFile, mkdir } from "node:fs/promises";
import openapiTS, { COMMENT_HEADER, astToString } from "openapi-typescript";

const here = new URL("../", import.meta.url);
// `--from FILE` reads another copy of the document (e.g. `git show HEAD:openapi/...` to generate
// exactly what a commit holds while the working tree has uncommitted proto changes).
const from = process.argv.indexOf("--from");
const source = from > 0 ? process.argv[from + 1] : new URL("../../openapi/cyberdesk.v1.openapi.json", here);
const target = new URL("src/generated/openapi.ts", here);

const document = JSON.parse(await readFile(source, "utf8"));
const generated = COMMENT_HEADER + astToString(await openapiTS(document));

if (process.argv.includes("--check")) {
  const current = await readFile(target, "utf8").catch(() => "");
  if (current !== generated) {
    console.error(
      "sdk/typescript/src/generated/openapi.ts is stale against openapi/cyberdesk.v1.openapi.json; run make proto",
    );
    process.exit(1);
  }
} else {
  await mkdir(new URL("src/generated/", here), { recursive: true });
  await writeFile(target, generated);
}
