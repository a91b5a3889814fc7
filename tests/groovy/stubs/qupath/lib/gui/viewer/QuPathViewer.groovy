package qupath.lib.gui.viewer

import qupath.lib.gui.viewer.overlays.BufferedImageOverlay
import standin.ImageState

/**
 * STAND-IN for QuPath's QuPathViewer (not QuPath): the 0.4-0.7 methods the panel calls
 * ({@code getOverlayOptions}, {@code getZPosition}, {@code getTPosition},
 * {@code setCustomPixelLayerOverlay}, {@code resetCustomPixelLayerOverlay},
 * {@code getCustomPixelLayerOverlay}, {@code repaint}). The overlay shown is recorded as
 * {@code "overlay": {"x", "y", "width", "height", "image_width", "image_height", "argb"}}.
 */
class QuPathViewer {
    private final OverlayOptions options = new OverlayOptions()
    private Object pixelLayer
    private final Set<Object> dropOnImageChange = Collections.newSetFromMap(new IdentityHashMap<Object, Boolean>())

    QuPathViewer() {
        ImageState.get().onImageSwitch {
            if (pixelLayer != null && dropOnImageChange.contains(pixelLayer))
                resetCustomPixelLayerOverlay()
        }
    }

    /** Stand-in: an overlay made with this viewer removes itself when another image is opened. */
    void removeOnImageChange(Object overlay) { dropOnImageChange.add(overlay) }

    OverlayOptions getOverlayOptions() { return options }

    int getZPosition() { return 0 }

    int getTPosition() { return 0 }

    Object getCustomPixelLayerOverlay() { return pixelLayer }

    void setCustomPixelLayerOverlay(Object overlay) {
        pixelLayer = overlay
        ImageState.get().overlay(describe(overlay))
    }

    void resetCustomPixelLayerOverlay() {
        pixelLayer = null
        ImageState.get().overlay(null)
    }

    void repaint() {}

    private static Map describe(Object overlay) {
        if (!(overlay instanceof BufferedImageOverlay))
            return [kind: overlay.getClass().getName()]
        def entry = ((BufferedImageOverlay) overlay).getRegionMap().entrySet().iterator().next()
        def img = entry.getValue()
        // the image's alpha + colour, row-major, for the test to compare with the heat map
        List<Integer> argb = []
        for (int y = 0; y < img.getHeight(); y++)
            for (int x = 0; x < img.getWidth(); x++)
                argb << img.getRGB(x, y)
        return [x: entry.getKey().getX(), y: entry.getKey().getY(), width: entry.getKey().getWidth(),
                height: entry.getKey().getHeight(), image_width: img.getWidth(), image_height: img.getHeight(),
                argb: argb]
    }
}
