# Sourced by the device scripts: installs the wheels carried in .whl/ (git-ignored; the device
# machine reaches no package index) into $SITE (/tmp/site) and puts it on PYTHONPATH. The
# device's own jax, flax and numpy stay: .whl holds none of them. `bash
# launch/bench_maxtext.sh --fetch` downloads the set (MaxText's, and euro_lm's ml_collections
# and grain, which the device image lacks). SKIP_INSTALL=1 reuses $SITE.
site=${SITE:-/tmp/site}
if [[ ${SKIP_INSTALL:-0} != 1 ]] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl 2>&1 | grep -v "^WARNING: Target directory" || true
fi
[[ -d $site ]] && export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
