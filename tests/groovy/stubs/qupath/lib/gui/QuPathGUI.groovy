package qupath.lib.gui

import qupath.lib.gui.viewer.QuPathViewer
import qupath.lib.images.ImageData
import qupath.lib.scripting.QP
import standin.ImageState

/**
 * STAND-IN for QuPath's QuPathGUI (not QuPath): {@code getInstance()} is null when QuPath runs
 * headless (here: unless the state file says "gui": true); {@code getImageData()} (the current
 * viewer's image: here the stand-in image, null when none is open) and {@code getViewer()}
 * (0.4+).
 */
class QuPathGUI {
    private static final QuPathGUI INSTANCE = new QuPathGUI()
    private final QuPathViewer viewer = new QuPathViewer()

    static QuPathGUI getInstance() { return ImageState.get().gui ? INSTANCE : null }

    ImageData<?> getImageData() { return QP.getCurrentImageData() }

    QuPathViewer getViewer() { return viewer }
}
