package qupath.lib.gui.dialogs

import standin.ImageState

/**
 * STAND-IN for QuPath 0.4's qupath.lib.gui.dialogs.Dialogs (not QuPath; QuPath 0.5+ also has
 * qupath.fx.dialogs.Dialogs with the same method): records the dialog instead of showing it.
 */
class Dialogs {
    static void showErrorMessage(String title, String message) {
        ImageState.get().dialog('error', title, message)
    }
}
