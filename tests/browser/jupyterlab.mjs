#!/usr/bin/env node
// Opens a notebook in JupyterLab in headless Chromium and runs its code cells one at a time, as a
// trainee would (select the cell, press Ctrl+Enter, wait for it to finish), then writes what the page
// shows for each code cell as JSON: the visible text of its output area (innerText), whether an error
// output is shown, the output area's HTML. Exits non-zero with a message on stderr when JupyterLab does
// not load, no kernel starts, or a cell does not finish in time.
//
//   node jupyterlab.mjs --url http://127.0.0.1:8888/ --token TOKEN --notebook dir/lab.ipynb \
//        --out result.json [--screenshot page.png] [--cell-timeout 60] [--load-timeout 90] \
//        [--chromium /usr/bin/chromium] [--width 1280] [--height 900] [--keep-kernel]
//
// The notebook's kernel is a fresh one, shut down at the end, unless --keep-kernel: then a kernel
// the notebook already has goes on being used, and is left running.
// The notebook path is relative to the server's root. The server should have news and update checks
// off and autosave off (tests/jupyterlab_page.py starts one so); a "Select Kernel" dialog is answered
// with the default kernel all the same.

import { chromium } from 'playwright-core';
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';

const STDERR_MIME = 'application/vnd.jupyter.stderr';
const usage = 'usage: node jupyterlab.mjs --url URL --token TOKEN --notebook PATH --out OUT.json [--screenshot PNG] '
  + '[--cell-timeout S] [--load-timeout S] [--chromium PATH] [--width PX] [--height PX] [--keep-kernel]';

class HarnessError extends Error {}

function options() {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        url: { type: 'string' }, token: { type: 'string', default: '' }, notebook: { type: 'string' },
        out: { type: 'string' }, screenshot: { type: 'string' },
        'cell-timeout': { type: 'string', default: '60' }, 'load-timeout': { type: 'string', default: '90' },
        chromium: { type: 'string', default: process.env.LABKIT_CHROMIUM || '/usr/bin/chromium' },
        width: { type: 'string', default: '1280' }, height: { type: 'string', default: '900' },
        'keep-kernel': { type: 'boolean', default: false },
      },
    }));
  } catch (e) {
    console.error(`jupyterlab.mjs: ${e.message}\n${usage}`);
    process.exit(2);
  }
  for (const name of ['url', 'notebook', 'out']) {
    if (!values[name]) {
      console.error(`jupyterlab.mjs: --${name} is required\n${usage}`);
      process.exit(2);
    }
  }
  return {
    base: values.url.endsWith('/') ? values.url : `${values.url}/`,
    token: values.token,
    notebook: values.notebook.replace(/^\/+/, ''),
    out: values.out,
    screenshot: values.screenshot,
    cellTimeout: Number(values['cell-timeout']) * 1000,
    loadTimeout: Number(values['load-timeout']) * 1000,
    chromium: values.chromium,
    viewport: { width: Number(values.width), height: Number(values.height) },
    keepKernel: values['keep-kernel'],
  };
}

const encodePath = (p) => p.split('/').map(encodeURIComponent).join('/');

async function api(opts, route, method = 'GET') {
  const url = `${opts.base}${route}`;
  let resp;
  try {
    resp = await fetch(url, { method, headers: opts.token ? { Authorization: `token ${opts.token}` } : {} });
  } catch (e) {
    throw new HarnessError(`JupyterLab at ${opts.base} does not answer: ${e.cause?.message || e.message}`);
  }
  if (!resp.ok) {
    const body = (await resp.text()).slice(0, 300);
    throw new HarnessError(`${method} ${opts.base}${route.split('?')[0]}: HTTP ${resp.status} ${body}`);
  }
  return resp.status === 204 ? null : resp.json();
}

// Shut down the kernels of the notebook's sessions, so that the run starts from a fresh kernel.
async function endSessions(opts) {
  const sessions = await api(opts, 'api/sessions');
  for (const s of sessions.filter((s) => s.path === opts.notebook)) {
    await api(opts, `api/sessions/${s.id}`, 'DELETE');
  }
}

const cellSource = (cell) => (Array.isArray(cell.source) ? cell.source.join('') : cell.source ?? '');

// The notebook's own panel: the one whose tab is showing.
const PANEL = '#jp-main-dock-panel .jp-NotebookPanel:not(.lm-mod-hidden)';

// Text of any open dialog, or null.
async function dialogText(page) {
  const dialogs = page.locator('.jp-Dialog');
  if ((await dialogs.count()) === 0) return null;
  return (await dialogs.first().innerText()).trim().replace(/\s+/g, ' ');
}

async function waitForKernel(page, opts, deadline) {
  let answered = 0;
  for (;;) {
    const state = await page.evaluate((panelSel) => {
      const panel = document.querySelector(panelSel);
      const indicator = panel?.querySelector('.jp-Notebook-ExecutionIndicator');
      const name = panel?.querySelector('.jp-KernelName, [data-jp-item-name="kernelName"]');
      return { status: indicator?.getAttribute('data-status') ?? null, name: name?.textContent?.trim() ?? null };
    }, PANEL);
    const dialog = await dialogText(page);
    if (dialog) {
      if (/select kernel/i.test(dialog) && answered < 3) {
        // Answer as a trainee would: the preferred kernel, python3 where it is offered.
        const select = page.locator('.jp-Dialog select');
        if ((await select.count()) > 0) {
          const values = await select.first().locator('option').evaluateAll(
            (os) => os.map((o) => o.value));
          const python = values.find((v) => /python3/.test(v));
          if (python) await select.first().selectOption(python);
        }
        await page.locator('.jp-Dialog .jp-mod-accept').first().click();
        answered += 1;
        continue;
      }
      throw new HarnessError(`a dialog blocks the notebook before its kernel started: "${dialog}"`);
    }
    if (state.status === 'idle' && state.name && !/no kernel/i.test(state.name)) return state.name;
    if (state.status === 'dead') throw new HarnessError(`the kernel died while starting (${state.name})`);
    if (Date.now() > deadline) {
      throw new HarnessError(`the kernel did not start within ${opts.loadTimeout / 1000}s `
        + `(kernel "${state.name}", status "${state.status}")`);
    }
    await page.waitForTimeout(200);
  }
}

// Everything the page shows for the cell at `index` (among all cells).
async function readCell(page, index) {
  return page.evaluate(({ panelSel, index, stderrMime }) => {
    const cell = document.querySelector(`${panelSel} .jp-Notebook-cell[data-windowed-list-index="${index}"]`);
    const area = cell?.querySelector('.jp-Cell-outputArea');
    const prompt = cell?.querySelector('.jp-InputPrompt')?.textContent ?? '';
    const count = prompt.match(/\[(\d+)\]/);
    const outputs = [...(area?.querySelectorAll('.jp-OutputArea-output') ?? [])].map((o) => ({
      mimeType: o.getAttribute('data-mime-type') ?? '',
      text: o.innerText,
      error: o.getAttribute('data-mime-type') === stderrMime,
    }));
    return {
      prompt: prompt.trim(),
      executionCount: count ? Number(count[1]) : null,
      text: area ? area.innerText : '',
      html: area ? area.innerHTML : '',
      outputs,
      error: outputs.some((o) => o.error),
      errorText: outputs.filter((o) => o.error).map((o) => o.text).join('\n'),
    };
  }, { panelSel: PANEL, index, stderrMime: STDERR_MIME });
}

async function runCell(page, opts, index, empty) {
  const cell = page.locator(`${PANEL} .jp-Notebook-cell[data-windowed-list-index="${index}"]`);
  await cell.scrollIntoViewIfNeeded();
  // Select the cell as a user does, by clicking beside its input (its prompt), which leaves edit mode.
  await cell.locator('.jp-InputPrompt').click();
  if (!(await cell.evaluate((el) => el.classList.contains('jp-mod-active')))) {
    throw new HarnessError(`cell ${index} could not be selected`);
  }
  // Note every prompt the cell shows from now on: a quick cell goes from [ ] through [*] to [n]
  // faster than one can poll, and a cell that ran before shows a number from the start.
  await cell.evaluate((el) => {
    const prompt = el.querySelector('.jp-InputPrompt');
    window.__labkitSeenBusy = false;
    window.__labkitObserver?.disconnect();
    window.__labkitObserver = new MutationObserver(() => {
      if (prompt.textContent.includes('*')) window.__labkitSeenBusy = true;
    });
    window.__labkitObserver.observe(prompt, { childList: true, characterData: true, subtree: true });
  });
  const started = Date.now();
  await page.keyboard.press('Control+Enter');
  const deadline = started + opts.cellTimeout;
  if (empty) {  // JupyterLab sends nothing to the kernel: it clears the cell's outputs and number
    await page.waitForFunction((el) => !/\[\d+\]/.test(el.querySelector('.jp-InputPrompt')?.textContent ?? ''),
      await cell.elementHandle(), { timeout: 5000 }).catch(() => {});
    await settle(page, index);
    return 0;
  }
  for (;;) {
    const state = await cell.evaluate((el, panelSel) => {
      const prompt = el.querySelector('.jp-InputPrompt')?.textContent ?? '';
      const status = document.querySelector(`${panelSel} .jp-Notebook-ExecutionIndicator`)?.getAttribute('data-status');
      if (prompt.includes('*')) window.__labkitSeenBusy = true;
      return { seenBusy: window.__labkitSeenBusy, prompt: prompt.trim(), status, done: /\[\d+\]/.test(prompt) };
    }, PANEL);
    if (state.seenBusy && state.done && state.status === 'idle') break;
    const dialog = await dialogText(page);
    if (dialog) throw new HarnessError(`a dialog appeared while cell ${index} ran: "${dialog}"`);
    if (state.status === 'dead') throw new HarnessError(`the kernel died while cell ${index} ran`);
    if (Date.now() > deadline) {
      const shown = await readCell(page, index);
      throw new HarnessError(`cell ${index} did not finish within ${opts.cellTimeout / 1000}s `
        + `(prompt "${state.prompt}", kernel ${state.status}); its output so far:\n${shown.text}`);
    }
    await page.waitForTimeout(50);
  }
  const seconds = (Date.now() - started) / 1000;
  await settle(page, index);
  await page.evaluate(() => window.__labkitObserver?.disconnect());
  return seconds;
}

// Wait until the cell's output area has stopped changing (renderers such as Markdown or images
// finish after the kernel is idle): 300 ms without a mutation, 3 s at most.
async function settle(page, index) {
  await page.evaluate(({ panelSel, index }) => new Promise((resolve) => {
    const area = document.querySelector(`${panelSel} .jp-Notebook-cell[data-windowed-list-index="${index}"] .jp-Cell-outputArea`);
    if (!area) { resolve(); return; }
    let timer = setTimeout(done, 300);
    const cap = setTimeout(done, 3000);
    const observer = new MutationObserver(() => { clearTimeout(timer); timer = setTimeout(done, 300); });
    observer.observe(area, { childList: true, characterData: true, subtree: true, attributes: true });
    function done() { observer.disconnect(); clearTimeout(timer); clearTimeout(cap); requestAnimationFrame(() => resolve()); }
  }), { panelSel: PANEL, index });
}

// A screenshot of the whole notebook: the window is made as tall as its cells (10000 px at most).
async function screenshot(page, file, viewport) {
  try {
    const height = await page.evaluate((panelSel) => {
      const outer = document.querySelector(`${panelSel} .jp-WindowedPanel-outer`);
      const cells = document.querySelectorAll(`${panelSel} .jp-Notebook-cell`);
      if (!outer || cells.length === 0) return null;
      const last = cells[cells.length - 1].getBoundingClientRect().bottom;
      const first = cells[0].getBoundingClientRect().top;
      return Math.ceil(last - first + outer.getBoundingClientRect().top + 80);
    }, PANEL);
    if (height && height > viewport.height) {
      await page.setViewportSize({ width: viewport.width, height: Math.min(height, 10000) });
      await page.locator(`${PANEL} .jp-WindowedPanel-outer`).evaluate((el) => { el.scrollTop = 0; });
      await page.waitForTimeout(300);
    }
  } catch { /* the picture is still worth having at the window's size */ }
  fs.mkdirSync(path.dirname(path.resolve(file)), { recursive: true });
  await page.screenshot({ path: file, fullPage: true });
}

async function main() {
  const opts = options();
  const t0 = Date.now();
  const loadDeadline = t0 + opts.loadTimeout;
  const model = await api(opts, `api/contents/${encodePath(opts.notebook)}?type=notebook&content=1`);
  const cells = model.content.cells;
  if (!opts.keepKernel) await endSessions(opts);

  let browser;
  try {
    browser = await chromium.launch({
      executablePath: opts.chromium,
      headless: true,
      args: [
        '--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
        '--disable-background-networking', '--disable-quic', '--no-first-run', '--disable-component-update',
        '--disable-sync', '--disable-default-apps', '--disable-extensions', '--no-default-browser-check',
        // Nothing but the server: any other host name fails to resolve at once.
        `--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE ${new URL(opts.base).hostname}`,
      ],
    });
  } catch (e) {
    throw new HarnessError(`Chromium did not start (${opts.chromium}): ${e.message.split('\n')[0]}`);
  }
  const consoleErrors = [];
  const offsite = [];
  let page;
  try {
    const context = await browser.newContext({ viewport: opts.viewport, deviceScaleFactor: 1 });
    page = await context.newPage();
    page.setDefaultTimeout(Math.max(opts.cellTimeout, 15000));
    page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()); });
    page.on('pageerror', (e) => consoleErrors.push(`uncaught: ${e.message}`));
    const origin = new URL(opts.base).origin;
    page.on('request', (r) => {
      const u = r.url();
      if (/^(https?|wss?):/.test(u) && !u.startsWith(origin)) offsite.push(u);
    });

    const url = `${opts.base}lab/tree/${encodePath(opts.notebook)}?reset${opts.token ? `&token=${encodeURIComponent(opts.token)}` : ''}`;
    let resp;
    try {
      resp = await page.goto(url, { waitUntil: 'domcontentloaded', timeout: opts.loadTimeout });
    } catch (e) {
      throw new HarnessError(`JupyterLab did not load from ${opts.base}: ${e.message.split('\n')[0]}`);
    }
    if (!resp || !resp.ok()) throw new HarnessError(`JupyterLab did not load from ${opts.base}: HTTP ${resp?.status()}`);
    try {
      await page.locator(`${PANEL} .jp-Notebook`).waitFor({ state: 'visible', timeout: Math.max(loadDeadline - Date.now(), 1000) });
    } catch {
      const dialog = await dialogText(page).catch(() => null);
      throw new HarnessError(`JupyterLab did not show the notebook ${opts.notebook} within ${opts.loadTimeout / 1000}s`
        + `${dialog ? ` (dialog: "${dialog}")` : ''}; page title "${await page.title()}"`
        + `${consoleErrors.length ? `; console errors:\n${consoleErrors.join('\n')}` : ''}`);
    }
    const kernel = await waitForKernel(page, opts, loadDeadline);
    const shown = await page.locator(`${PANEL} .jp-Notebook-cell`).count();
    if (shown !== cells.length) {
      throw new HarnessError(`the page shows ${shown} cells, the notebook has ${cells.length}`);
    }

    const results = [];
    for (let index = 0; index < cells.length; index++) {
      const cell = cells[index];
      if (cell.cell_type !== 'code') continue;
      const source = cellSource(cell);
      const executed = source.trim() !== '';  // JupyterLab does not send an empty cell to the kernel
      const seconds = await runCell(page, opts, index, !executed);
      const seen = await readCell(page, index);
      results.push({
        index, source, executed, executionCount: seen.executionCount, text: seen.text, error: seen.error,
        errorText: seen.errorText, html: seen.html, outputs: seen.outputs, seconds,
      });
    }

    let shot = null;
    if (opts.screenshot) {
      await screenshot(page, opts.screenshot, opts.viewport);
      shot = path.resolve(opts.screenshot);
    }
    const sessions = await api(opts, 'api/sessions').catch(() => []);
    const session = sessions.find((s) => s.path === opts.notebook);
    fs.writeFileSync(opts.out, JSON.stringify({
      notebook: opts.notebook,
      kernel: { displayName: kernel, name: session?.kernel?.name ?? null },
      cells: results,
      console: consoleErrors,
      offsite,
      screenshot: shot,
      seconds: (Date.now() - t0) / 1000,
    }, null, 1));
  } catch (e) {
    if (opts.screenshot && page) {  // what the page showed when it went wrong
      await page.screenshot({ path: opts.screenshot }).catch(() => {});
    }
    throw e;
  } finally {
    await browser.close().catch(() => {});
    if (!opts.keepKernel) await endSessions(opts).catch(() => {});
  }
}

main().catch((e) => {
  const message = e instanceof HarnessError ? e.message : (e.stack || String(e));
  console.error(`jupyterlab.mjs: ${message}`);
  process.exit(1);
});
