package qupath.lib.gui.viewer

/** STAND-IN for QuPath's OverlayOptions (not QuPath): only passed to overlays here. */
class OverlayOptions {
}
