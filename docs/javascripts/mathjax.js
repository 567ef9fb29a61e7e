// MathJax 3 configuration. Pages: pymdownx.arithmatex (generic mode) wraps maths in
// .arithmatex with \( \) and \[ \]. Notebooks (mkdocs-jupyter, in .jupyter-wrapper) keep
// Jupyter's $ and $$. The rest of the page (Material's containers) is ignored, so a stray
// "$" in prose or a table is never read as maths; MathJax lets a processed class inside an
// ignored one through, and its descendants inherit that.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    ignoreHtmlClass: "md-typeset|md-nav|md-header|md-footer|md-search",
    processHtmlClass: "arithmatex|jupyter-wrapper"
  }
};

// Material's instant navigation (if enabled) swaps pages without a reload: typeset each one.
if (typeof document$ !== "undefined") {
  document$.subscribe(() => {
    if (window.MathJax && MathJax.startup && MathJax.typesetPromise) {
      MathJax.startup.output.clearCache();
      MathJax.typesetClear();
      MathJax.texReset();
      MathJax.typesetPromise();
    }
  });
}
