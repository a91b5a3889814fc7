package qupath.lib.gui

import standin.ImageState

/**
 * STAND-IN for QuPath's QuPathGUI (not QuPath): {@code getInstance()} is null when QuPath runs
 * headless (here: unless the state file says "gui": true).
 */
class QuPathGUI {
    private static final QuPathGUI INSTANCE = new QuPathGUI()

    static QuPathGUI getInstance() { return ImageState.get().gui ? INSTANCE : null }
}
