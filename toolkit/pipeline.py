"""The three jobs' old home, kept so that `from toolkit.pipeline import ...` goes on working.

Each job now has its module: `toolkit.build` (`build_pack`, run as its
stages), `toolkit.captioner` (`Captioner`, `caption_images`) and
`toolkit.score` (`evaluate_packs`); `load_pack` is in `toolkit.pack`,
`Report` in `toolkit.progress`, the searches in `toolkit.generate`. New code
imports from those; nothing is defined here.
"""

from toolkit.build import (  # noqa: F401
    CACHE_DIR, IN_MEMORY_FEATURES_BYTES, TRANSLATION_CACHE_FILE, WORK_DIR, BuildResult, build_pack, find_split_files,
)
from toolkit.captioner import Captioner, Captions, caption_images  # noqa: F401
from toolkit.generate import beam_search_batched  # noqa: F401
from toolkit.pack import LoadedPack, load_pack, resolve_langs  # noqa: F401
from toolkit.progress import Report  # noqa: F401
from toolkit.score import evaluate_packs  # noqa: F401
